//! Remote peers: export, import, peer layouts, notifications.

use std::ffi::c_char;

use super::boundary::{deref, fail, null_argument, slice, write_out};
use super::context::kvx_context;
use super::layout::kvx_layout;
use super::status::KVX_STATUS_OK;
use crate::error::Error;
use crate::layout::Layout;
use crate::peer::Peer;

/// Bytes kvxfer allocated for the caller; release with kvx_bytes_free().
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct kvx_bytes {
    pub data: *mut u8,
    pub len: usize,
}

/// A remote peer imported from its exported bytes: its agent and layouts. Thread-safe.
/// kvx_peer_free() of the last peer of an agent unloads its metadata; layout handles taken from
/// it stay valid (transfers through them then fail with KVX_STATUS_PEER).
pub struct kvx_peer {
    inner: Peer,
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<kvx_peer>()
};

/// Serialises the context's NIXL agent metadata and descriptors of `layouts` (local layouts of
/// this context, not DISK) into a versioned, checksummed blob for a peer's kvx_context_import(),
/// authenticated with the context's peer_key where it has one.
/// The layouts are registered with the agent for as long as they live, so the peer can reach
/// them. On KVX_STATUS_OK *bytes_out holds the blob, released with kvx_bytes_free(); on error it
/// is untouched. Errors: NULL_ARGUMENT, INVALID_ARGUMENT (a layout of another context, a peer's
/// layout, a disk layout), UNAVAILABLE (context without NIXL), NIXL.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_context_export(
    context: *mut kvx_context,
    layouts: *const *const kvx_layout,
    n_layouts: usize,
    bytes_out: *mut kvx_bytes,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid context or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        // SAFETY: `layouts` holds n_layouts pointers (the function's contract).
        let handles = try_status!(unsafe { slice(layouts, n_layouts, "layouts") });
        if bytes_out.is_null() {
            return null_argument("bytes_out");
        }
        let mut list: Vec<&Layout> = Vec::with_capacity(handles.len());
        for (i, &h) in handles.iter().enumerate() {
            // SAFETY: each entry is a valid layout handle or NULL.
            let l = try_status!(unsafe { deref(h, &format!("layouts[{i}]")) });
            list.push(&l.inner);
        }
        let bytes = try_core!(ctx.inner.export(&list)).into_boxed_slice();
        let len = bytes.len();
        let data = Box::into_raw(bytes).cast::<u8>();
        // SAFETY: checked non-NULL above; kvx_bytes_free() rebuilds the box from data/len.
        unsafe { write_out(bytes_out, kvx_bytes { data, len }) };
        KVX_STATUS_OK
    }
}

/// Releases bytes from kvx_context_export() and sets data to NULL and len to 0. NULL, or a
/// kvx_bytes whose data is NULL, is a no-op: the struct is left as it is.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_bytes_free(bytes: *mut kvx_bytes) {
    ffi_boundary! {
        // SAFETY: the caller passes a valid kvx_bytes or NULL.
        let Some(b) = (unsafe { bytes.as_mut() }) else {
            return;
        };
        if b.data.is_null() {
            return;
        }
        // SAFETY: data/len came from a boxed slice that kvxfer leaked into this struct.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(b.data, b.len)) });
        b.data = std::ptr::null_mut();
        b.len = 0;
    }
}

/// Imports a peer from bytes it exported with kvx_context_export(). The bytes are untrusted:
/// version, length, checksum and every field are checked, and malformed, truncated or foreign
/// bytes give KVX_STATUS_PEER, never a crash. With a peer_key in the context's config, a blob
/// not made with the same key is KVX_STATUS_PEER before NIXL sees any of it; without one, the
/// peer's NIXL metadata is trusted (see kvx_context_config.peer_key). Importing one peer
/// several times gives peers that each keep its metadata loaded until they are freed. On
/// KVX_STATUS_OK *peer_out owns the peer, released with kvx_peer_free(); on error it is
/// untouched. Errors: NULL_ARGUMENT, PEER, UNAVAILABLE (context without NIXL).
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_context_import(
    context: *mut kvx_context,
    data: *const u8,
    len: usize,
    peer_out: *mut *mut kvx_peer,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid context or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        // SAFETY: `data` holds len bytes (the function's contract).
        let data = try_status!(unsafe { slice(data, len, "data") });
        if peer_out.is_null() {
            return null_argument("peer_out");
        }
        let inner = try_core!(ctx.inner.import(data));
        let handle = Box::into_raw(Box::new(kvx_peer { inner }));
        // SAFETY: checked non-NULL above.
        unsafe { write_out(peer_out, handle) };
        KVX_STATUS_OK
    }
}

/// Number of layouts the peer exported; 0 for NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_peer_layout_count(peer: *const kvx_peer) -> usize {
    ffi_boundary! {
        // SAFETY: the caller passes a valid peer or NULL.
        unsafe { peer.as_ref() }.map_or(0, |p| p.inner.layouts().len())
    }
}

/// A new handle to the peer's layout `index` (a remote layout), released with kvx_layout_free().
/// Errors: NULL_ARGUMENT, OUT_OF_RANGE. On error *layout_out is untouched.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_peer_layout(
    peer: *const kvx_peer,
    index: usize,
    layout_out: *mut *mut kvx_layout,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid peer or NULL.
        let p = try_status!(unsafe { deref(peer, "peer") });
        if layout_out.is_null() {
            return null_argument("layout_out");
        }
        let layouts = p.inner.layouts();
        let Some(layout) = layouts.get(index) else {
            return fail(Error::OutOfRange(format!(
                "peer layout {index} out of range (peer has {})",
                layouts.len()
            )));
        };
        let handle = Box::into_raw(Box::new(kvx_layout { inner: layout.clone() }));
        // SAFETY: checked non-NULL above.
        unsafe { write_out(layout_out, handle) };
        KVX_STATUS_OK
    }
}

/// Unloads a peer. NULL is a no-op; freeing twice is undefined behaviour.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kvx_peer_free(peer: *mut kvx_peer) {
    ffi_boundary! {
        if !peer.is_null() {
            // SAFETY: a non-NULL pointer came from kvx_context_import and is freed once.
            drop(unsafe { Box::from_raw(peer) });
        }
    }
}

/// Dequeues the oldest notification a peer sent to this context with a write (`notify_msg`):
/// the sender's agent name (NUL-terminated, needing its length + 1 bytes of agent_cap) and the
/// message (msg_cap bytes at least its length; its length in *msg_len_out).
/// KVX_STATUS_OK: one was dequeued and written; KVX_STATUS_PENDING: none yet (outputs untouched).
/// Errors: NULL_ARGUMENT, INVALID_ARGUMENT (buffers too small: the message says the sizes needed
/// and the notification stays queued), UNAVAILABLE (context without NIXL), NIXL.
#[unsafe(no_mangle)]
#[must_use]
pub unsafe extern "C" fn kvx_context_next_notification(
    context: *mut kvx_context,
    agent_out: *mut c_char,
    agent_cap: usize,
    msg_out: *mut u8,
    msg_cap: usize,
    msg_len_out: *mut usize,
) -> i32 {
    ffi_boundary! {
        // SAFETY: the caller passes a valid context or NULL.
        let ctx = try_status!(unsafe { deref(context, "context") });
        if agent_out.is_null() && agent_cap > 0 {
            return null_argument("agent_out");
        }
        if msg_out.is_null() && msg_cap > 0 {
            return null_argument("msg_out");
        }
        if msg_len_out.is_null() {
            return null_argument("msg_len_out");
        }
        let got = try_core!(ctx.inner.next_notification(|sender, msg| {
            if sender.len() + 1 > agent_cap || msg.len() > msg_cap {
                return Err(Error::InvalidArgument(format!(
                    "the next notification needs agent_out of {} bytes and msg_out of {} bytes \
                     (given {agent_cap} and {msg_cap}); it stays queued",
                    sender.len() + 1,
                    msg.len()
                )));
            }
            // SAFETY: agent_out holds agent_cap >= len + 1 bytes and msg_out msg_cap >= msg.len()
            // bytes (the function's contract, checked above); msg_len_out is non-NULL.
            unsafe {
                std::ptr::copy_nonoverlapping(sender.as_ptr(), agent_out.cast::<u8>(), sender.len());
                *agent_out.add(sender.len()) = 0;
                if !msg.is_empty() {
                    std::ptr::copy_nonoverlapping(msg.as_ptr(), msg_out, msg.len());
                }
                write_out(msg_len_out, msg.len());
            }
            Ok(())
        }));
        match got {
            Some(()) => KVX_STATUS_OK,
            None => super::status::KVX_STATUS_PENDING,
        }
    }
}
