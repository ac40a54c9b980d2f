//! Where kvxfer's `tracing` events go when it is used through the C ABI: to the runtime's
//! callback (`kvx_set_log_callback`) where one is set, else to stderr as far as `KVX_LOG`
//! (env-filter syntax: `info`, `kvxfer=debug`, ...) lets them through; nowhere by default.
//! Rust users install their own subscriber instead and never call `install`.

use std::fmt::Write as _;
use std::sync::{Once, RwLock};

use tracing::field::{Field, Visit};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::{Context, Filter, Layer, SubscriberExt};

/// A runtime's logger: `(level, target, message, user)`, levels 1 (error) to 5 (trace).
pub(crate) type Callback = unsafe extern "C" fn(
    i32,
    *const std::ffi::c_char,
    *const std::ffi::c_char,
    *mut std::ffi::c_void,
);

#[derive(Clone, Copy)]
struct Sink {
    callback: Callback,
    max: Level,
    user: usize,
}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);
static INSTALL: Once = Once::new();

/// 1 (error) to 5 (trace), as the C API numbers levels.
pub(crate) fn level_number(l: Level) -> i32 {
    match l {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

/// The level of a C API number, `None` outside 1..=5.
pub(crate) fn level_of(n: i32) -> Option<Level> {
    Some(match n {
        1 => Level::ERROR,
        2 => Level::WARN,
        3 => Level::INFO,
        4 => Level::DEBUG,
        5 => Level::TRACE,
        _ => return None,
    })
}

/// Sends events to the callback, or `KVX_LOG`'s share of them to stderr.
struct Output {
    env: Option<EnvFilter>,
}

impl<S: Subscriber> Filter<S> for Output {
    fn enabled(&self, meta: &Metadata<'_>, cx: &Context<'_, S>) -> bool {
        match *SINK.read().unwrap_or_else(|p| p.into_inner()) {
            Some(sink) => meta.level() <= &sink.max,
            None => self
                .env
                .as_ref()
                .is_some_and(|f| Filter::<S>::enabled(f, meta, cx)),
        }
    }

    // The sink can change at any time: decide per event.
    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }
}

/// The message and fields of an event as one line.
#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

struct Emit;

impl<S: Subscriber> Layer<S> for Emit {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut line = Line::default();
        event.record(&mut line);
        let meta = event.metadata();
        let sink = *SINK.read().unwrap_or_else(|p| p.into_inner());
        match sink {
            Some(sink) => {
                let c = |s: &str| std::ffi::CString::new(s.replace('\0', " ")).unwrap_or_default();
                let (target, message) = (c(meta.target()), c(&line.0));
                // SAFETY: the runtime registered this callback for these arguments; the strings
                // live for the call.
                unsafe {
                    (sink.callback)(
                        level_number(*meta.level()),
                        target.as_ptr(),
                        message.as_ptr(),
                        sink.user as *mut std::ffi::c_void,
                    )
                };
            }
            None => eprintln!("kvxfer {} {}: {}", meta.level(), meta.target(), line.0),
        }
    }
}

/// Installs kvxfer's subscriber as the process's default, once, unless the process has one.
pub(crate) fn install() {
    INSTALL.call_once(|| {
        let env = std::env::var("KVX_LOG")
            .ok()
            .and_then(|v| EnvFilter::try_new(v).ok());
        let subscriber = tracing_subscriber::registry().with(Emit.with_filter(Output { env }));
        // A runtime that embeds kvxfer from Rust may have its own: then that one stays.
        let _ = tracing::subscriber::set_global_default(subscriber);
    });
}

/// Sends events up to `max` to `callback` (with `user`), or with `None` back to stderr.
pub(crate) fn set_callback(callback: Option<Callback>, max: Level, user: usize) {
    install();
    *SINK.write().unwrap_or_else(|p| p.into_inner()) = callback.map(|callback| Sink {
        callback,
        max,
        user,
    });
    tracing::callsite::rebuild_interest_cache();
}
