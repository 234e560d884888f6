//! The `gateway` command, built inside the test package so end-to-end tests can start it
//! as a separate process (and `kill -9` it).

fn main() -> std::process::ExitCode {
    gateway::cli::main()
}
