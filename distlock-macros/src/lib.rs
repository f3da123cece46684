//! The `#[distributed_lock]` attribute for [distlock](https://docs.rs/distlock).

mod attr;
mod expand;
mod template;

/// Runs the body of an `async fn` while holding a distributed lock.
#[proc_macro_attribute]
pub fn distributed_lock(
    args: proc_macro::TokenStream,
    item: proc_macro::TokenStream,
) -> proc_macro::TokenStream {
    expand::distributed_lock(args.into(), item.into()).into()
}
