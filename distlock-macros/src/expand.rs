//! Code generation: keep the function's attributes, visibility and signature,
//! and replace its body with one call of distlock's runner that runs the
//! original body as an `async move` block.

use std::time::Duration;

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::parse::{Parse, ParseStream, Parser};
use syn::spanned::Spanned;
use syn::{
    Attribute, Block, Expr, FnArg, Ident, Pat, ReturnType, Signature, Stmt, Token, Type, Visibility,
};

use crate::attr::{Args, OnBusy};
use crate::template::{Field, Piece, Placeholder, Template};

/// The entry point: the expanded function, or the original item followed by
/// the errors, so editors keep seeing the function.
pub(crate) fn distributed_lock(args: TokenStream, item: TokenStream) -> TokenStream {
    let function = match syn::parse2::<AsyncFn>(item.clone()) {
        Ok(function) => function,
        Err(e) => return token_stream_with_error(item, e),
    };
    let args = syn::parse2::<Args>(args);
    let tokio = match function.sig.asyncness {
        Some(_) => None,
        None => TokioBody::find(&function.body),
    };
    let checked = check(&function.sig, tokio.is_some());
    match (args, checked) {
        (Ok(args), Ok(ret)) => match expand(&args, &function, ret, tokio) {
            Ok(tokens) => tokens,
            Err(e) => token_stream_with_error(item, e),
        },
        (Err(mut e), Err(more)) => {
            e.combine(more);
            token_stream_with_error(item, e)
        }
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => token_stream_with_error(item, e),
    }
}

fn token_stream_with_error(mut tokens: TokenStream, error: syn::Error) -> TokenStream {
    tokens.extend(error.into_compile_error());
    tokens
}

/// A function whose body is kept as tokens: it is wrapped, not parsed (except
/// for a plain `fn`, see `TokioBody`), so a body that does not parse yet still
/// gets the expansion and its own errors.
struct AsyncFn {
    attrs: Vec<Attribute>,
    vis: Visibility,
    sig: Signature,
    inner_attrs: Vec<Attribute>,
    body: TokenStream,
}

impl Parse for AsyncFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let attrs = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        let sig: Signature = input.parse().map_err(|e| {
            syn::Error::new(e.span(), "`#[distributed_lock]` goes on an `async fn`")
        })?;
        if input.peek(Token![;]) {
            return Err(syn::Error::new(
                sig.ident.span(),
                "`#[distributed_lock]` needs a function body: put it on the implementation, not the trait's declaration",
            ));
        }
        let content;
        syn::braced!(content in input);
        let inner_attrs = content.call(Attribute::parse_inner)?;
        let body = content.parse()?;
        Ok(AsyncFn {
            attrs,
            vis,
            sig,
            inner_attrs,
            body,
        })
    }
}

/// What `#[tokio::test]` and `#[tokio::main]` leave when they expand before this
/// attribute: a plain `fn` whose first statement, `let body = async { .. };`,
/// holds the original body. The lock then wraps that block.
struct TokioBody {
    /// `let body =`, with its attributes.
    binding: TokenStream,
    /// The `async` block's attributes.
    async_attrs: Vec<Attribute>,
    /// The original body.
    stmts: Vec<Stmt>,
    /// tokio's statements after it (pinning, `block_on`).
    rest: Vec<Stmt>,
}

impl TokioBody {
    fn find(body: &TokenStream) -> Option<TokioBody> {
        let stmts = Parser::parse2(Block::parse_within, body.clone()).ok()?;
        let (first, rest) = stmts.split_first()?;
        let Stmt::Local(local) = first else {
            return None;
        };
        let Pat::Ident(name) = &local.pat else {
            return None;
        };
        let init = local.init.as_ref()?;
        let Expr::Async(block) = &*init.expr else {
            return None;
        };
        if name.ident != "body" || init.diverge.is_some() || block.capture.is_some() {
            return None;
        }
        let (attrs, let_token, pat, eq) =
            (&local.attrs, local.let_token, &local.pat, init.eq_token);
        Some(TokioBody {
            binding: quote!(#(#attrs)* #let_token #pat #eq),
            async_attrs: block.attrs.clone(),
            stmts: block.block.stmts.clone(),
            rest: rest.to_vec(),
        })
    }
}

/// Checks the signature: `async` (or tokio's expansion of an `async fn`), and a
/// return type whose path ends in `Result`, which is returned.
fn check(sig: &Signature, tokio: bool) -> syn::Result<&Type> {
    let not_async = (sig.asyncness.is_none() && !tokio).then(|| {
        syn::Error::new(
            sig.fn_token.span,
            "`#[distributed_lock]` needs an `async fn`: the lock is held across the body's awaits",
        )
    });
    let ret = match &sig.output {
        ReturnType::Type(_, ty) if is_result(ty) => Ok(&**ty),
        ReturnType::Type(_, ty) => Err(syn::Error::new_spanned(
            ty,
            "`#[distributed_lock]` functions must return `Result<T, E>` with `E: From<distlock::Error>`: \
             a lock that times out, is busy or is lost returns its error through it",
        )),
        ReturnType::Default => Err(syn::Error::new(
            sig.ident.span(),
            "`#[distributed_lock]` functions must return `Result<T, E>` with `E: From<distlock::Error>`, \
             not `()`: a lock that times out, is busy or is lost returns its error through it",
        )),
    };
    match (not_async, ret) {
        (None, ret) => ret,
        (Some(e), Ok(_)) => Err(e),
        (Some(mut e), Err(more)) => {
            e.combine(more);
            Err(e)
        }
    }
}

/// `Result<..>`, `io::Result<..>`, `anyhow::Result<..>`: a path ending in `Result`.
fn is_result(ty: &Type) -> bool {
    match ty {
        Type::Path(p) if p.qself.is_none() => {
            p.path.segments.last().is_some_and(|s| s.ident == "Result")
        }
        Type::Paren(p) => is_result(&p.elem),
        Type::Group(g) => is_result(&g.elem),
        _ => false,
    }
}

fn expand(
    args: &Args,
    function: &AsyncFn,
    ret: &Type,
    tokio: Option<TokioBody>,
) -> syn::Result<TokenStream> {
    let AsyncFn {
        attrs,
        vis,
        sig,
        inner_attrs,
        body,
    } = function;
    let krate = match &args.krate {
        Some(path) => path.to_token_stream(),
        None => quote_spanned!(ret.span()=> ::distlock),
    };
    let keys = args
        .keys
        .iter()
        .map(|k| key(k, sig))
        .collect::<syn::Result<Vec<_>>>()?;
    // The template as written names the lock in metrics: few series, one per
    // function (the templates joined, for several keys).
    let name = match args.keys.as_slice() {
        [(_, lit)] => lit.clone(),
        many => {
            let joined: Vec<String> = many.iter().map(|(_, lit)| lit.value()).collect();
            let span = many
                .first()
                .map_or_else(Span::call_site, |(_, lit)| lit.span());
            syn::LitStr::new(&joined.join(", "), span)
        }
    };
    let (key, many) = if args.many {
        let joined = quote!(::std::string::String::new());
        (joined, quote!(::std::vec![#(#keys),*]))
    } else {
        (quote!(#(#keys)*), quote!(::std::vec::Vec::new()))
    };
    let locker = match &args.locker {
        Some(expr) => quote_spanned! {expr.span()=>
            #krate::__private::locker(&(#expr))
        },
        None => quote!(#krate::__private::default_locker()),
    };
    let policy = policy(args, &krate);
    // An `async` block takes its output type from its first `return`: this one
    // (never taken) makes it the declared return type, so that the body's `?`
    // and coercions (`Ok(Box::new(x))` into `Box<dyn Trait>`) work as they do
    // in the function itself. `impl Trait` cannot be named here; it needs no
    // coercion.
    let fake_return = (!contains_impl(ret.to_token_stream())).then(|| {
        quote_spanned! {ret.span()=>
            #[allow(
                unknown_lints,
                unreachable_code,
                clippy::diverging_sub_expression,
                clippy::empty_loop,
                clippy::let_unit_value,
                clippy::needless_return,
                clippy::unreachable
            )]
            if false {
                let __distlock_return: #ret = loop {};
                return __distlock_return;
            }
        }
    });
    let permits = match args.semaphore {
        Some(n) => quote!(::core::option::Option::Some(#n)),
        None => quote!(::core::option::Option::None),
    };
    let fair = args.fair;
    let run = match args.on_busy {
        OnBusy::Skip => quote!(run_or_skip),
        OnBusy::Wait | OnBusy::Reject => quote!(run),
    };
    // Spanned at the return type: a return type the runner cannot use is
    // reported there.
    let call = |body: TokenStream| {
        quote_spanned! {ret.span()=>
            #krate::__private::#run(
                #krate::__private::Call { locker: #locker, key: #key, keys: #many, name: #name, permits: #permits, fair: #fair, policy: #policy },
                async move { #fake_return #body },
            ).await
        }
    };
    let body = match tokio {
        None => call(body.clone()),
        Some(TokioBody {
            binding,
            async_attrs,
            stmts,
            rest,
        }) => {
            let call = call(quote!(#(#stmts)*));
            quote! {
                #binding #(#async_attrs)* async { #call };
                #(#rest)*
            }
        }
    };
    Ok(quote! {
        #(#attrs)*
        #vis #sig {
            #(#inner_attrs)*
            #body
        }
    })
}

fn contains_impl(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|tt| match tt {
        proc_macro2::TokenTree::Ident(i) => i == "impl",
        proc_macro2::TokenTree::Group(g) => contains_impl(g.stream()),
        _ => false,
    })
}

/// The `Policy` expression: `const fn` setters on `Policy::new()`.
fn policy(args: &Args, krate: &TokenStream) -> TokenStream {
    let duration = |d: Duration| {
        let (secs, nanos) = (d.as_secs(), d.subsec_nanos());
        quote!(::core::time::Duration::new(#secs, #nanos))
    };
    let mut policy = quote!(#krate::Policy::new());
    if let Some(d) = args.timeout {
        let d = duration(d);
        policy.extend(quote!(.timeout(#d)));
    }
    match args.on_busy {
        OnBusy::Wait => {}
        OnBusy::Skip => policy.extend(quote!(.on_busy(#krate::OnBusy::Skip))),
        OnBusy::Reject => policy.extend(quote!(.on_busy(#krate::OnBusy::Reject))),
    }
    for (setter, value) in [
        ("at_least", args.at_least),
        ("at_most", args.at_most),
        ("expiry", args.expiry),
    ] {
        if let Some(d) = value {
            let setter = Ident::new(setter, Span::call_site());
            let d = duration(d);
            policy.extend(quote!(.#setter(#d)));
        }
    }
    policy
}

/// The key expression: the literal as a `String`, or a `format!` of the
/// placeholders, each checked against the names the parameters bind.
fn key((template, lit): &(Template, syn::LitStr), sig: &Signature) -> syn::Result<TokenStream> {
    let span = lit.span();
    let bound = bound_names(sig);
    let mut values = Vec::new();
    for placeholder in template.placeholders() {
        values.push(placeholder_expr(placeholder, &bound, span)?);
    }
    if values.is_empty() {
        let text: String = template
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Literal(text) => text.as_str(),
                Piece::Placeholder(_) => "",
            })
            .collect();
        let text = syn::LitStr::new(&text, span);
        return Ok(quote!(::std::string::String::from(#text)));
    }
    let format = syn::LitStr::new(&template.format_string(), span);
    Ok(quote!(::std::format!(#format, #(#values),*)))
}

/// `name.field.0`, with the parameter's own identifier and the template's span.
fn placeholder_expr(
    placeholder: &Placeholder,
    bound: &[Ident],
    span: Span,
) -> syn::Result<TokenStream> {
    let Some(name) = bound.iter().find(|i| unraw(i) == placeholder.name) else {
        return Err(unknown_name(placeholder, bound, span));
    };
    let mut expr = if name == "self" {
        quote_spanned!(span=> self)
    } else {
        let mut name = name.clone();
        name.set_span(span);
        name.into_token_stream()
    };
    for field in &placeholder.fields {
        match field {
            Field::Named(field) => {
                let mut ident = syn::parse_str::<Ident>(field).map_err(|_| {
                    syn::Error::new(
                        span,
                        format!(
                            "invalid field `{field}` in placeholder `{{{}}}`",
                            placeholder.display()
                        ),
                    )
                })?;
                ident.set_span(span);
                expr.extend(quote_spanned!(span=> .#ident));
            }
            Field::Index(index) => {
                let index = syn::Index {
                    index: *index,
                    span,
                };
                expr.extend(quote_spanned!(span=> .#index));
            }
        }
    }
    Ok(expr)
}

fn unknown_name(placeholder: &Placeholder, bound: &[Ident], span: Span) -> syn::Error {
    let known = if bound.is_empty() {
        "this function has no parameters".to_owned()
    } else {
        let names: Vec<String> = bound.iter().map(|i| format!("`{}`", unraw(i))).collect();
        format!("the parameters are {}", names.join(", "))
    };
    let what = if placeholder.name == "self" {
        "`self` in the key template, but the function takes no `self`".to_owned()
    } else {
        format!(
            "unknown name `{}` in the key template's placeholder `{{{}}}`",
            placeholder.name,
            placeholder.display()
        )
    };
    syn::Error::new(span, format!("{what}; {known}"))
}

fn unraw(ident: &Ident) -> String {
    syn::ext::IdentExt::unraw(ident).to_string()
}

/// Every name the parameters bind: `self`, plain names, and names inside
/// patterns (`Path(id): Path<u64>`, `State(AppState { db, .. }): State<AppState>`).
fn bound_names(sig: &Signature) -> Vec<Ident> {
    let mut names = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Receiver(r) => names.push(Ident::new("self", r.self_token.span)),
            FnArg::Typed(t) => pattern_names(&t.pat, &mut names),
        }
    }
    names
}

fn pattern_names(pat: &Pat, names: &mut Vec<Ident>) {
    match pat {
        Pat::Ident(p) => {
            names.push(p.ident.clone());
            if let Some((_, sub)) = &p.subpat {
                pattern_names(sub, names);
            }
        }
        Pat::Struct(p) => p.fields.iter().for_each(|f| pattern_names(&f.pat, names)),
        Pat::TupleStruct(p) => p.elems.iter().for_each(|p| pattern_names(p, names)),
        Pat::Tuple(p) => p.elems.iter().for_each(|p| pattern_names(p, names)),
        Pat::Slice(p) => p.elems.iter().for_each(|p| pattern_names(p, names)),
        Pat::Reference(p) => pattern_names(&p.pat, names),
        Pat::Paren(p) => pattern_names(&p.pat, names),
        Pat::Type(p) => pattern_names(&p.pat, names),
        // Every alternative binds the same names.
        Pat::Or(p) => p.cases.iter().take(1).for_each(|p| pattern_names(p, names)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sig: TokenStream) -> Vec<String> {
        let sig: Signature = syn::parse2(sig).unwrap();
        bound_names(&sig).iter().map(unraw).collect()
    }

    #[test]
    fn names_bound_in_patterns_are_found() {
        assert_eq!(
            names(quote! {
                async fn h(
                    &self,
                    Path(user_id): Path<u64>,
                    State(AppState { db, cache: c, .. }): State<AppState>,
                    (a, [b, ..]): (u8, [u8; 2]),
                    r#type: &str,
                    whole @ Wrapper(inner): Wrapper,
                    _: (),
                )
            }),
            ["self", "user_id", "db", "c", "a", "b", "type", "whole", "inner"]
        );
    }

    #[test]
    fn result_paths_are_recognised() {
        for ty in [
            quote!(Result<(), E>),
            quote!(std::io::Result<u8>),
            quote!(anyhow::Result<()>),
        ] {
            assert!(is_result(&syn::parse2(ty).unwrap()));
        }
        for ty in [
            quote!(()),
            quote!(Option<u8>),
            quote!(Results<u8>),
            quote!(&Result<(), E>),
        ] {
            assert!(!is_result(&syn::parse2(ty).unwrap()));
        }
    }

    #[test]
    fn tokio_expansion_is_recognised_and_other_bodies_are_not() {
        let tokio = quote! {
            let body = async { work().await?; Ok(()) };
            ::tokio::pin!(body);
            return rt.block_on(body);
        };
        let found = TokioBody::find(&tokio).unwrap();
        assert_eq!((found.stmts.len(), found.rest.len()), (2, 2));
        for other in [
            quote!(let body = async move { 1 };),
            quote!(let other = async { 1 };),
            quote!(work(); let body = async { 1 };),
            quote!(this does not parse),
        ] {
            assert!(TokioBody::find(&other).is_none(), "{other}");
        }
    }

    #[test]
    fn impl_trait_is_detected_at_any_depth() {
        assert!(contains_impl(quote!(Result<Vec<impl Display>, E>)));
        assert!(!contains_impl(quote!(Result<Vec<u8>, E>)));
    }
}
