//! `build-agent`: runs buildpool jobs on a build host (see [`build_agent::cli`]).

fn main() -> anyhow::Result<()> {
    build_agent::cli::main()
}
