//! A container's environment and command line as the kubelet builds them: literal values,
//! downward-API fields, and `$(VAR)` expansion against the variables defined before.
//! Values from Secrets and ConfigMaps are not read here (that needs permissions and is only
//! done for the cookie, see [`super::cookie`]).
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{Container, Pod};

/// A piece of a string under Kubernetes' `$(VAR)` expansion: see [`pieces`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece<'a> {
    /// Text that stands as it is (`$$` already made `$`).
    Text(&'a str),
    /// A `$(NAME)` reference, and the reference as written, which stays when NAME is unknown.
    Var { name: &'a str, written: &'a str },
}

/// Splits `s` for Kubernetes' `$(VAR)` expansion, in order: `$$` is `$`, `$(NAME)` a
/// reference, any other `$` (an unclosed `$(` too) stays as written. The kubelet's rules; both
/// [`expand`] and the cookie's lazy look-ups ([`super::cookie`]) resolve these pieces.
pub fn pieces(s: &str) -> impl Iterator<Item = Piece<'_>> {
    let mut rest = s;
    let mut pending = None;
    std::iter::from_fn(move || {
        if let Some(p) = pending.take() {
            return Some(p);
        }
        if rest.is_empty() {
            return None;
        }
        let Some(i) = rest.find('$') else {
            return Some(Piece::Text(std::mem::take(&mut rest)));
        };
        let (text, after) = (&rest[..i], &rest[i + 1..]);
        let piece = if let Some(stripped) = after.strip_prefix('$') {
            rest = stripped;
            Piece::Text("$")
        } else if let Some(end) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let piece = Piece::Var {
                name: &after[1..=end],
                written: &rest[i..i + end + 3],
            };
            rest = &after[end + 2..];
            piece
        } else {
            rest = after;
            Piece::Text("$")
        };
        if text.is_empty() {
            Some(piece)
        } else {
            pending = Some(piece);
            Some(Piece::Text(text))
        }
    })
}

/// Kubernetes' `$(VAR)` expansion (unknown references stay as they are; `$$` is `$`).
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for p in pieces(s) {
        let piece = match p {
            Piece::Text(t) => t,
            Piece::Var { name, written } => vars.get(name).map_or(written, String::as_str),
        };
        if !push_bounded(&mut out, piece) {
            break;
        }
    }
    out
}

/// The longest value an expansion makes (what an Erlang node name or cookie needs is far less).
pub const MAX_EXPANDED: usize = 64 * 1024;

/// What all of one container's variables, or all of its command line, may add up to.
pub const MAX_EXPANDED_TOTAL: usize = 1024 * 1024;

/// Appends `piece`, cut at [`MAX_EXPANDED`] in all; false once the bound is reached. A spec can
/// double a value with each variable (`B=$(A)$(A)`), so every expansion stops here.
pub fn push_bounded(out: &mut String, piece: &str) -> bool {
    let room = MAX_EXPANDED.saturating_sub(out.len());
    if piece.len() <= room {
        out.push_str(piece);
        return true;
    }
    let mut cut = room;
    while !piece.is_char_boundary(cut) {
        cut -= 1;
    }
    out.push_str(&piece[..cut]);
    false
}

/// The downward-API fields beamredir can see from the pod object.
pub fn field_ref(pod: &Pod, path: &str, ip: Option<IpAddr>) -> Option<String> {
    match path {
        "status.podIP" => ip
            .map(|i| i.to_string())
            .or_else(|| pod.status.as_ref()?.pod_ip.clone()),
        "status.hostIP" => pod.status.as_ref()?.host_ip.clone(),
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "metadata.uid" => pod.metadata.uid.clone(),
        "spec.nodeName" => pod.spec.as_ref()?.node_name.clone(),
        "spec.serviceAccountName" => pod.spec.as_ref()?.service_account_name.clone(),
        _ => None,
    }
}

/// The container's variables with literal and downward-API values, expanded in order as the
/// kubelet does (a variable may refer to those defined before it).
pub fn resolved_env(pod: &Pod, container: &Container) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    // Many variables each referring to a large one must not add up without end either.
    let mut total = 0usize;
    for e in container.env.iter().flatten() {
        if total > MAX_EXPANDED_TOTAL {
            break;
        }
        let value = match (
            &e.value,
            e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()),
        ) {
            (Some(v), _) => Some(expand(v, &vars)),
            (None, Some(field)) => field_ref(pod, &field.field_path, None),
            _ => None,
        };
        if let Some(v) = value {
            total += e.name.len() + v.len();
            vars.insert(e.name.clone(), v);
        }
    }
    vars
}

/// The container's command line after expansion, split into words, including the words of
/// `sh -c "…"` strings and of the flags variables OTP reads (ERL_AFLAGS, ERL_FLAGS, ERL_ZFLAGS).
pub fn words(container: &Container, vars: &BTreeMap<String, String>) -> Vec<String> {
    let mut total = 0usize;
    let argv = container
        .command
        .iter()
        .flatten()
        .chain(container.args.iter().flatten())
        .map_while(|a| {
            // The whole command line is bounded too, not only each argument.
            (total <= MAX_EXPANDED_TOTAL).then(|| expand(a, vars)).inspect(|w| total += w.len())
        });
    let flags = ["ERL_AFLAGS", "ERL_FLAGS", "ERL_ZFLAGS"]
        .into_iter()
        .filter_map(|k| vars.get(k).cloned());
    argv.chain(flags)
        .flat_map(|a| {
            a.split_whitespace()
                .map(|w| w.trim_matches(|c| c == '"' || c == '\'').to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The word after `flag` (any of `flags`), e.g. `-name X`.
pub fn flag_value<'a>(words: &'a [String], flags: &[&str]) -> Option<&'a str> {
    words
        .windows(2)
        .find(|w| flags.contains(&w[0].as_str()))
        .map(|w| w[1].as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubling_variables_stop_at_the_bound() {
        let mut vars = BTreeMap::new();
        vars.insert("V0".to_string(), "x".repeat(1000));
        for i in 1..64 {
            let v = expand(&format!("$(V{})$(V{})", i - 1, i - 1), &vars);
            assert!(v.len() <= MAX_EXPANDED, "{}", v.len());
            vars.insert(format!("V{i}"), v);
        }
        assert!(vars["V63"].len() > MAX_EXPANDED / 2);
        // A value past the bound is cut, not dropped.
        assert_eq!(expand(&"é".repeat(MAX_EXPANDED), &vars).len(), MAX_EXPANDED);
    }

    #[test]
    fn many_references_to_a_large_variable_stop_at_the_total() {
        let mut env = vec![serde_json::json!({"name": "X", "value": "x".repeat(MAX_EXPANDED)})];
        env.extend((0..10_000).map(|i| serde_json::json!({"name": format!("A{i}"), "value": "$(X)"})));
        let container: Container = serde_json::from_value(serde_json::json!({
            "name": "app",
            "env": env,
            "args": vec!["$(X)"; 10_000],
        }))
        .unwrap();
        let vars = resolved_env(&Pod::default(), &container);
        let sum: usize = vars.values().map(String::len).sum();
        assert!(sum <= MAX_EXPANDED_TOTAL + MAX_EXPANDED + 64, "{sum}");
        let words = words(&container, &vars);
        let sum: usize = words.iter().map(String::len).sum();
        assert!(sum <= MAX_EXPANDED_TOTAL + MAX_EXPANDED, "{sum}");
    }

    #[test]
    fn expansion_like_the_kubelet() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$", &vars), "$");
        assert_eq!(expand("$(A", &vars), "$(A");
    }

    #[test]
    fn pieces_in_order() {
        use Piece::{Text, Var};
        let p = |s| pieces(s).collect::<Vec<_>>();
        assert_eq!(
            p("x$(A)y$$(B)$(C$"),
            [
                Text("x"),
                Var {
                    name: "A",
                    written: "$(A)"
                },
                Text("y"),
                Text("$"),
                Text("(B)"),
                Text("$"),
                Text("(C"),
                Text("$")
            ]
        );
        assert_eq!(
            p("$(A)$(B)"),
            [
                Var {
                    name: "A",
                    written: "$(A)"
                },
                Var {
                    name: "B",
                    written: "$(B)"
                }
            ]
        );
        assert_eq!(
            p("$()"),
            [Var {
                name: "",
                written: "$()"
            }]
        );
        assert_eq!(p(""), []);
    }
}
