//! `buildpool`: the workstation binary.

fn main() -> std::process::ExitCode {
    buildpool::cli::main()
}
