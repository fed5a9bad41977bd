//! Rebuilds this crate when a migration is added or changed, so `sqlx::migrate!` embeds it
//! (the macro alone does not notice new files).

fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
