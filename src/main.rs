/// mimalloc: per-request allocations (headers, buffers, futures) are small and short-lived, and
/// glibc's malloc was ~20 % of the proxy's CPU in profiles (README "Performance").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tollgate::cli::main()
}
