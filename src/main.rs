//! The `kiln` binary: everything happens in [`kiln::cli`].

fn main() -> std::process::ExitCode {
    kiln::cli::main()
}
