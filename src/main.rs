//! The `kmsfs` binary: the command line in `cli`, over the `kmsfs`
//! library. No unsafe code here: syscalls go through `kmsfs::sys`.
#![forbid(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
