//! `sqlx::migrate!` embeds `migrations/` at compile time; rebuild when a migration changes
//! (cargo would otherwise not notice an edit to a `.sql` file alone).
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
