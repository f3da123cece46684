//! The attribute's arguments: `key = "...", timeout = "5s", ...`, parsed and
//! checked. Every error carries the span of the offending token.

use std::time::Duration;

use proc_macro2::Span;
use syn::ext::IdentExt;
use syn::parse::{Parse, ParseStream};
use syn::{Expr, Ident, LitStr, Path, Token};

use crate::limits::{MAX_EXPIRY, MAX_HOLD, MIN_EXPIRY};
use crate::template::Template;

mod kw {
    syn::custom_keyword!(key);
    syn::custom_keyword!(keys);
    syn::custom_keyword!(timeout);
    syn::custom_keyword!(on_busy);
    syn::custom_keyword!(at_least);
    syn::custom_keyword!(at_most);
    syn::custom_keyword!(expiry);
    syn::custom_keyword!(locker);
    syn::custom_keyword!(semaphore);
    syn::custom_keyword!(fair);
}

/// Every option, in the order the docs give them.
const OPTIONS: &str =
    "`key`, `keys`, `timeout`, `on_busy`, `at_least`, `at_most`, `expiry`, `semaphore`, `fair`, `locker`, `crate`";

/// The core's check of a hold bound (`at_most`, `at_least`), as
/// `distlock`'s `check_hold`: `at_least` may be zero, `at_most` may not.
fn hold_limit(name: &'static str) -> impl Fn(Duration) -> Option<String> {
    move |d| {
        let zero_ok = name == "at_least";
        ((d.is_zero() && !zero_ok) || d > MAX_HOLD).then(|| {
            let low = if zero_ok { "0" } else { "1ms" };
            format!("`{name}` must be between {low} and 365 days")
        })
    }
}

/// The parsed arguments of `#[distributed_lock(...)]`.
pub(crate) struct Args {
    /// Each key's template and the literal it came from (for spans): one
    /// with `key`, one or more with `keys`.
    pub(crate) keys: Vec<(Template, LitStr)>,
    /// `keys = [...]`: every key at once (`Locker::lock_many`).
    pub(crate) many: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) on_busy: OnBusy,
    pub(crate) at_least: Option<Duration>,
    pub(crate) at_most: Option<Duration>,
    pub(crate) expiry: Option<Duration>,
    pub(crate) locker: Option<Expr>,
    pub(crate) krate: Option<Path>,
    /// `semaphore = N`: N holders at once instead of one.
    pub(crate) semaphore: Option<u32>,
    /// `fair = true`: waiters queue on the server (`Lock::fair`).
    pub(crate) fair: bool,
}

/// `on_busy = "..."`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OnBusy {
    Wait,
    Skip,
    Reject,
}

/// What the parser collects before checking that `key` was given.
#[derive(Default)]
struct Builder {
    key: Option<(Template, LitStr)>,
    /// With the span of the option's name.
    keys: Option<(Vec<(Template, LitStr)>, Span)>,
    /// With the span of the option's name.
    timeout: Option<(Duration, Span)>,
    on_busy: Option<OnBusy>,
    at_least: Option<Duration>,
    at_most: Option<Duration>,
    expiry: Option<Duration>,
    locker: Option<Expr>,
    krate: Option<Path>,
    /// With the span of the option's name.
    semaphore: Option<(u32, Span)>,
    /// With the span of the option's name.
    fair: Option<(bool, Span)>,
}

impl Parse for Args {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let mut b = Builder::default();
        while !input.is_empty() {
            let lookahead = input.lookahead1();
            if lookahead.peek(kw::key) {
                let name = input.parse::<kw::key>()?;
                let lit = value::<LitStr>(input, "key", "\"invoice:{invoice.id}\"")?;
                let template = template(&lit)?;
                set(&mut b.key, (template, lit), name.span, "key")?;
            } else if lookahead.peek(kw::keys) {
                let name = input.parse::<kw::keys>()?;
                input.parse::<Token![=]>()?;
                let list = key_list(input)?;
                set(&mut b.keys, (list, name.span), name.span, "keys")?;
            } else if lookahead.peek(kw::timeout) {
                let name = input.parse::<kw::timeout>()?;
                let d = duration(input, "timeout", |_| None)?;
                set(&mut b.timeout, (d, name.span), name.span, "timeout")?;
            } else if lookahead.peek(kw::on_busy) {
                let name = input.parse::<kw::on_busy>()?;
                let lit = value::<LitStr>(input, "on_busy", "\"wait\"")?;
                let on_busy = match lit.value().as_str() {
                    "wait" => OnBusy::Wait,
                    "skip" => OnBusy::Skip,
                    "reject" => OnBusy::Reject,
                    other => {
                        return Err(syn::Error::new(
                            lit.span(),
                            format!(
                                "invalid `on_busy` value `{other}`: expected \"wait\", \"skip\" or \"reject\""
                            ),
                        ))
                    }
                };
                set(&mut b.on_busy, on_busy, name.span, "on_busy")?;
            } else if lookahead.peek(kw::at_least) {
                let name = input.parse::<kw::at_least>()?;
                let d = duration(input, "at_least", hold_limit("at_least"))?;
                set(&mut b.at_least, d, name.span, "at_least")?;
            } else if lookahead.peek(kw::at_most) {
                let name = input.parse::<kw::at_most>()?;
                let d = duration(input, "at_most", hold_limit("at_most"))?;
                set(&mut b.at_most, d, name.span, "at_most")?;
            } else if lookahead.peek(kw::expiry) {
                let name = input.parse::<kw::expiry>()?;
                let d = duration(input, "expiry", |d| {
                    (d < MIN_EXPIRY || d > MAX_EXPIRY)
                        .then(|| "`expiry` must be between 100ms and 24h".to_owned())
                })?;
                set(&mut b.expiry, d, name.span, "expiry")?;
            } else if lookahead.peek(kw::locker) {
                let name = input.parse::<kw::locker>()?;
                input.parse::<Token![=]>()?;
                let expr = input.parse::<Expr>()?;
                set(&mut b.locker, expr, name.span, "locker")?;
            } else if lookahead.peek(Token![crate]) {
                let name = input.parse::<Token![crate]>()?;
                let lit = value::<LitStr>(input, "crate", "\"distlock\"")?;
                let path = lit.parse::<Path>().map_err(|_| {
                    syn::Error::new(
                        lit.span(),
                        format!(
                            "`crate` must be a path, like \"distlock\"; got `{}`",
                            lit.value()
                        ),
                    )
                })?;
                set(&mut b.krate, path, name.span, "crate")?;
            } else if lookahead.peek(kw::semaphore) {
                let name = input.parse::<kw::semaphore>()?;
                let lit = value::<syn::LitInt>(input, "semaphore", "3")?;
                let permits = lit
                    .base10_parse::<u32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| {
                        syn::Error::new(
                            lit.span(),
                            "`semaphore` is the number of permits: a whole number from 1 to 4294967295",
                        )
                    })?;
                set(
                    &mut b.semaphore,
                    (permits, name.span),
                    name.span,
                    "semaphore",
                )?;
            } else if lookahead.peek(kw::fair) {
                let name = input.parse::<kw::fair>()?;
                let lit = value::<syn::LitBool>(input, "fair", "true")?;
                set(&mut b.fair, (lit.value, name.span), name.span, "fair")?;
            } else if input.peek(Ident::peek_any) {
                let name = input.call(Ident::parse_any)?;
                return Err(syn::Error::new(
                    name.span(),
                    format!("unknown option `{name}`; the options are {OPTIONS}"),
                ));
            } else {
                return Err(lookahead.error());
            }
            if input.is_empty() {
                break;
            }
            input.parse::<Token![,]>()?;
        }
        b.build()
    }
}

impl Builder {
    fn build(self) -> syn::Result<Args> {
        let (keys, many) = match (self.key, self.keys) {
            (Some(_), Some((_, span))) => {
                return Err(syn::Error::new(
                    span,
                    "`key` and `keys` cannot be combined: list every key in `keys`",
                ))
            }
            (Some(key), None) => (vec![key], false),
            (None, Some((keys, _))) => {
                if let Some((true, span)) = self.fair {
                    return Err(syn::Error::new(
                        span,
                        "`fair` applies to one `key`: `keys` takes every key at once, with no line",
                    ));
                }
                if let Some((_, span)) = self.semaphore {
                    return Err(syn::Error::new(
                        span,
                        "`semaphore` applies to one `key`: `keys` takes mutexes on every key",
                    ));
                }
                (keys, true)
            }
            (None, None) => {
                return Err(syn::Error::new(
                    Span::call_site(),
                    "missing `key`: name the lock, like `#[distributed_lock(key = \"invoice:{invoice.id}\")]` (or several, like `keys = [\"account:{from}\", \"account:{to}\"]`)",
                ))
            }
        };
        if let (Some((true, span)), Some(_)) = (self.fair, self.semaphore) {
            return Err(syn::Error::new(
                span,
                "`fair` applies to a mutex: a `semaphore` has no line",
            ));
        }
        let on_busy = self.on_busy.unwrap_or(OnBusy::Wait);
        if let (Some((_, span)), OnBusy::Skip | OnBusy::Reject) = (self.timeout, on_busy) {
            return Err(syn::Error::new(
                span,
                "`timeout` applies to `on_busy = \"wait\"` only: \"skip\" and \"reject\" make one attempt and never wait",
            ));
        }
        Ok(Args {
            keys,
            many,
            timeout: self.timeout.map(|(d, _)| d),
            on_busy,
            at_least: self.at_least,
            at_most: self.at_most,
            expiry: self.expiry,
            locker: self.locker,
            krate: self.krate,
            semaphore: self.semaphore.map(|(n, _)| n),
            fair: self.fair.is_some_and(|(f, _)| f),
        })
    }
}

/// A key template, checked, with errors at the literal.
fn template(lit: &LitStr) -> syn::Result<Template> {
    Template::parse(&lit.value())
        .and_then(|t| t.check_literal_text().map(|()| t))
        .map_err(|e| syn::Error::new(lit.span(), e))
}

/// `["account:{from}", "account:{to}"]`: at least one key template, each a
/// string literal checked as `key`'s.
fn key_list(input: ParseStream<'_>) -> syn::Result<Vec<(Template, LitStr)>> {
    let example = "`keys = [\"account:{from}\", \"account:{to}\"]`";
    if !input.peek(syn::token::Bracket) {
        return Err(syn::Error::new(
            input.span(),
            format!("`keys` expects a list of string literals, like {example}"),
        ));
    }
    let content;
    let brackets = syn::bracketed!(content in input);
    let mut keys = Vec::new();
    while !content.is_empty() {
        let fork = content.fork();
        let lit = content.parse::<LitStr>().map_err(|_| {
            syn::Error::new(
                fork.span(),
                format!("each of `keys` must be a string literal, like {example}"),
            )
        })?;
        keys.push((template(&lit)?, lit));
        if content.is_empty() {
            break;
        }
        content.parse::<Token![,]>()?;
    }
    if keys.is_empty() {
        return Err(syn::Error::new(
            brackets.span.join(),
            format!("`keys` needs at least one key, like {example}"),
        ));
    }
    Ok(keys)
}

/// Stores an option, refusing a second occurrence at its name.
fn set<T>(slot: &mut Option<T>, value: T, span: Span, name: &str) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new(
            span,
            format!("`{name}` set multiple times"),
        ));
    }
    *slot = Some(value);
    Ok(())
}

/// `= <literal>`, with an error at the value if it is not the expected kind.
fn value<T: Parse>(input: ParseStream<'_>, name: &str, example: &str) -> syn::Result<T> {
    input.parse::<Token![=]>()?;
    let fork = input.fork();
    match input.parse::<T>() {
        Ok(v) => Ok(v),
        Err(_) => {
            let what = match example.chars().next() {
                Some('"') => "a string literal",
                Some('t' | 'f') => "`true` or `false`",
                _ => "a number",
            };
            Err(syn::Error::new(
                fork.span(),
                format!("`{name}` expects {what}, like `{name} = {example}`"),
            ))
        }
    }
}

/// `= "5s"`: a humantime duration, checked by `bounds` (which returns the
/// message for a value out of range).
fn duration(
    input: ParseStream<'_>,
    name: &str,
    bounds: impl FnOnce(Duration) -> Option<String>,
) -> syn::Result<Duration> {
    let lit = value::<LitStr>(input, name, "\"5s\"")?;
    let d = humantime::parse_duration(&lit.value()).map_err(|e| {
        syn::Error::new(
            lit.span(),
            format!(
                "invalid duration `{}` for `{name}`: {e}; write it like \"5s\", \"500ms\" or \"1m 30s\"",
                lit.value()
            ),
        )
    })?;
    match bounds(d) {
        Some(message) => Err(syn::Error::new(lit.span(), message)),
        None => Ok(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(tokens: proc_macro2::TokenStream) -> syn::Result<Args> {
        syn::parse2(tokens)
    }

    fn err(tokens: proc_macro2::TokenStream) -> String {
        match parse(tokens) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_option_parses() {
        let args = parse(quote::quote! {
            key = "job:{id}", timeout = "1s 500ms", on_busy = "wait", at_least = "1m",
            at_most = "10m", expiry = "30s", locker = self.locks, crate = "my_distlock",
        })
        .unwrap();
        assert_eq!(args.timeout, Some(Duration::from_millis(1500)));
        assert!(matches!(args.on_busy, OnBusy::Wait));
        assert_eq!(args.at_least, Some(Duration::from_secs(60)));
        assert_eq!(args.at_most, Some(Duration::from_secs(600)));
        assert_eq!(args.expiry, Some(Duration::from_secs(30)));
        assert!(args.locker.is_some());
        assert!(args.krate.is_some());
    }

    #[test]
    fn defaults_are_wait_without_limits() {
        let args = parse(quote::quote!(key = "k")).unwrap();
        assert!(matches!(args.on_busy, OnBusy::Wait));
        assert_eq!(args.timeout, None);
        assert!(args.locker.is_none());
    }

    #[test]
    fn zero_timeout_is_one_attempt_and_accepted() {
        let args = parse(quote::quote!(key = "k", timeout = "0s")).unwrap();
        assert_eq!(args.timeout, Some(Duration::ZERO));
    }

    #[test]
    fn missing_key_is_refused() {
        assert!(err(quote::quote!(timeout = "5s")).contains("missing `key`"));
        assert!(err(quote::quote!()).contains("missing `key`"));
    }

    #[test]
    fn unknown_options_list_the_valid_ones() {
        let e = err(quote::quote!(key = "k", retries = 3));
        assert!(e.contains("unknown option `retries`"), "{e}");
        assert!(e.contains("`at_least`"), "{e}");
    }

    #[test]
    fn repeated_options_are_refused() {
        assert_eq!(
            err(quote::quote!(key = "k", timeout = "1s", timeout = "2s")),
            "`timeout` set multiple times"
        );
    }

    #[test]
    fn out_of_range_durations_are_refused() {
        assert!(err(quote::quote!(key = "k", expiry = "50ms")).contains("between 100ms and 24h"));
        assert!(err(quote::quote!(key = "k", at_most = "0s")).contains("between 1ms"));
        assert!(err(quote::quote!(key = "k", timeout = "soon")).contains("invalid duration"));
        assert!(err(quote::quote!(key = "k", timeout = 5)).contains("string literal"));
    }

    #[test]
    fn timeout_without_waiting_is_refused() {
        for on_busy in ["skip", "reject"] {
            let e = err(quote::quote!(key = "k", on_busy = #on_busy, timeout = "1s"));
            assert!(e.contains("applies to `on_busy = \"wait\"` only"), "{e}");
        }
        assert!(parse(quote::quote!(key = "k", on_busy = "wait", timeout = "1s")).is_ok());
    }

    #[test]
    fn semaphore_takes_a_positive_permit_count() {
        assert!(err(quote::quote!(key = "k", semaphore = 0)).contains("number of permits"));
        assert!(err(quote::quote!(key = "k", semaphore = "3")).contains("semaphore"));
        assert!(err(quote::quote!(key = "k", semaphore = 2, semaphore = 3))
            .contains("set multiple times"));
    }
}
