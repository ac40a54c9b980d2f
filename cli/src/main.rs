//! `kvxfer`: the command line. `plan` prints the planner's table, `demo` moves verified blocks
//! across the tiers this machine has, `bench` measures transfers against baselines.

mod bench;
mod demo;
mod doctor;
mod plan;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "kvxfer",
    version,
    about = "Move LLM KV-cache blocks between storage tiers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the planner's decision for every pair of locations, or for one pair.
    Plan(plan::Args),
    /// Move blocks across this machine's tiers, verify checksums, print each hop.
    Demo(demo::Args),
    /// Measure transfers against baselines run in the same process.
    Bench(bench::Args),
    /// What this machine gives kvxfer: GPUs, NVRTC, NIXL and its backends, ulimit -l.
    Doctor(doctor::Args),
    /// The peer process of `bench --gpu-rdma` (started by the bench).
    #[command(hide = true)]
    RdmaPeer(bench::gpu_rdma::PeerArgs),
}

fn main() -> std::process::ExitCode {
    // Behave like other Unix tools when the reader goes away (`kvxfer plan | head`).
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    kvxfer::log_from_env();
    let result = match cli.command {
        Command::Plan(a) => plan::run(&a),
        Command::Demo(a) => demo::run(&a),
        Command::Bench(a) => bench::run(&a),
        Command::Doctor(a) => doctor::run(&a),
        Command::RdmaPeer(a) => bench::gpu_rdma::peer(&a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvxfer: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
