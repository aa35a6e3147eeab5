//! Evaluating an Erlang or Elixir expression on a node, from Rust, over any stream.
//!
//! The connection is a [`DistConnection`] (hidden, dynamic name). Calls go to the node's `rex`
//! server with the message hidden C nodes use (`erl_interface`'s `ei_rpc`, a documented API):
//! `{self(), {call, M, F, Args, GroupLeader}}` to the registered name `rex`, answered by
//! `{rex, Reply}`. With the group leader `send_stdout_to_caller` (OTP 23+) whatever the call
//! prints comes back as `{rex_stdout, Binary}` messages before the reply.
//!
//! An expression is evaluated by a fixed wrapper, scanned and parsed on the node
//! (`erl_scan:string/1`, `erl_parse:parse_exprs/1`) and run with `erl_eval:exprs/2`. The
//! wrapper parses and evaluates the user's text, which it gets as a UTF-8 binary bound to its
//! variable `BeamredirSource` (an `erl_eval` binding: never text that is parsed as part of the
//! wrapper, so no quoting can break out, and the wrapper's syntax tree, which travels to this
//! process and back, is the same for every expression, however long or nested; the user's
//! own tree never leaves the node), catches every exception, and formats on the node: `~tp` for Erlang,
//! `Kernel.inspect/2` (pretty) for Elixir, `erl_error:format_exception/4` and
//! `Exception.format_banner/3` for errors. Only binaries come back, so nothing about the
//! result's terms needs to be understood here.
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    cookie::Cookie,
    dist::{DistConnection, DistError},
    etf::Term,
    handshake::NodeIdentity,
};

/// Longest expression accepted (its code points travel as tokens: about 20 bytes each).
pub const MAX_EXPRESSION: usize = 64 * 1024;

/// Most of what an evaluation's printing is kept (a node can print without end within the
/// timeout); past it the rest is dropped and stderr says so.
pub const MAX_PRINTED: usize = 16 * 1024 * 1024;

/// How often to tick while waiting for a reply (nodes drop a silent peer after `net_ticktime`,
/// 60 s by default, and tick every quarter of it).
const TICK_EVERY: Duration = Duration::from_secs(15);

/// The language of an expression.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    Erlang,
    Elixir,
}

/// What an evaluation produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    /// What the expression printed on the node, in order (at most [`MAX_PRINTED`] bytes).
    pub output: Vec<u8>,
    /// The node printed more than [`MAX_PRINTED`]; the rest was dropped.
    pub output_cut: bool,
    pub outcome: Outcome,
}

/// The result of evaluating an expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The value, formatted like the shell does (`~tp`, or `inspect` for Elixir).
    Value(String),
    /// The expression raised; the exception formatted like the shell does.
    Raised(String),
    /// The text is not a valid expression; the parser's message.
    ParseError(String),
}

impl Evaluation {
    /// 0 for a value, 1 for an exception, 2 for a parse error.
    pub fn exit_code(&self) -> i32 {
        match self.outcome {
            Outcome::Value(_) => 0,
            Outcome::Raised(_) => 1,
            Outcome::ParseError(_) => 2,
        }
    }

    /// Prints the node's output and the value to `out`, or the error to `err`.
    pub fn print(&self, out: &mut dyn std::io::Write, err: &mut dyn std::io::Write) -> std::io::Result<()> {
        out.write_all(&self.output)?;
        if self.output_cut {
            writeln!(err, "beamredir: the node printed more than {} MiB; the rest was dropped", MAX_PRINTED >> 20)?;
        }
        match &self.outcome {
            Outcome::Value(v) => writeln!(out, "{v}"),
            Outcome::Raised(e) | Outcome::ParseError(e) => writeln!(err, "{}", e.trim_end()),
        }
    }
}

/// What runs on a node, for choosing `iex --remsh` or `erl -remsh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Runtime {
    /// Elixir's modules are loadable (`code:which('Elixir.Kernel')`).
    pub elixir: bool,
    /// IEx is loadable, which `iex --remsh` needs on the remote node.
    pub iex: bool,
}

/// How an evaluation failed (not the expression: that is an [`Outcome`]).
#[derive(Debug, Error)]
pub enum RpcError {
    #[error("{0}")]
    Dist(#[from] DistError),
    #[error("the node {0} does not run Elixir (its code path has no Elixir.Code); evaluate Erlang instead")]
    NoElixir(String),
    #[error("the expression is {0} bytes long; at most {MAX_EXPRESSION} are accepted")]
    TooLong(usize),
    #[error("the call {call} failed on the node: {reason}")]
    Badrpc { call: String, reason: String },
    #[error("the node answered {call} with {answer}, which beamredir does not understand")]
    Unexpected { call: String, answer: String },
    #[error("the node did not answer within {0:?}")]
    Timeout(Duration),
}

/// Which group leader a call runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Output goes to the node's `user` (its stdout, not ours).
    Discard,
    /// Output comes back to us (`send_stdout_to_caller`).
    Capture,
}

/// An RPC client on one connection.
pub struct RpcClient<S> {
    conn: DistConnection<S>,
    next: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RpcClient<S> {
    /// Connects with `cookie` (see [`DistConnection::connect`]).
    pub async fn connect(stream: S, cookie: &Cookie, timeout: Duration) -> Result<Self, RpcError> {
        Ok(RpcClient { conn: DistConnection::connect(stream, cookie, timeout).await?, next: 1 })
    }

    /// The node, as it names itself.
    pub fn node(&self) -> &NodeIdentity {
        self.conn.peer()
    }

    /// Our dynamic name on the node.
    pub fn local_name(&self) -> &str {
        self.conn.local_name()
    }

    /// Calls `M:F(Args)` on the node; returns the reply and what the call printed.
    pub async fn call(&mut self, m: &str, f: &str, args: Vec<Term>, output: Output, timeout: Duration) -> Result<(Term, Vec<u8>), RpcError> {
        match tokio::time::timeout(timeout, self.call_inner(m, f, args, output)).await {
            Ok(r) => r,
            Err(_) => Err(RpcError::Timeout(timeout)),
        }
    }

    async fn call_inner(&mut self, m: &str, f: &str, args: Vec<Term>, output: Output) -> Result<(Term, Vec<u8>), RpcError> {
        let id = self.next;
        self.next += 1;
        let me = Term::Pid(self.conn.local_pid(id));
        let gl = match output {
            Output::Discard => "user",
            Output::Capture => "send_stdout_to_caller",
        };
        let request = Term::tuple(vec![
            me.clone(),
            Term::tuple(vec![Term::atom("call"), Term::atom(m), Term::atom(f), Term::list(args), Term::atom(gl)]),
        ]);
        // REG_SEND: {6, FromPid, '', ToName}
        let control = Term::tuple(vec![Term::Int(6), me.clone(), Term::atom(""), Term::atom("rex")]);
        self.conn.send(&control, Some(&request)).await?;
        let mut printed = Vec::new();
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + TICK_EVERY, TICK_EVERY);
        loop {
            let msg = tokio::select! {
                m = self.conn.recv() => m?,
                _ = ticker.tick() => {
                    self.conn.tick().await?;
                    continue;
                }
            };
            // SEND {2, _, To} and SEND_SENDER {22, From, To} addressed to this call's pid.
            let to_us = match msg.control.as_tuple() {
                Some([Term::Int(2 | 22), _, to]) => *to == me,
                _ => false,
            };
            let Some(payload) = msg.payload.filter(|_| to_us) else { continue };
            match payload.as_tuple() {
                Some([Term::Atom(tag), data]) if tag == "rex_stdout" => {
                    if let Some(bytes) = data.as_bytes() {
                        // One byte past the bound marks the output as cut (see eval).
                        let room = (MAX_PRINTED + 1).saturating_sub(printed.len());
                        printed.extend_from_slice(&bytes[..bytes.len().min(room)]);
                    }
                }
                Some([Term::Atom(tag), reply]) if tag == "rex" => {
                    if reply.is_tagged("badrpc") {
                        let reason = reply.as_tuple().and_then(|t| t.get(1)).map(Term::to_string).unwrap_or_default();
                        return Err(RpcError::Badrpc { call: format!("{m}:{f}"), reason: clip(&reason) });
                    }
                    return Ok((reply.clone(), printed));
                }
                _ => continue,
            }
        }
    }

    /// Evaluates `source` on the node, bounded by `timeout` in all.
    pub async fn eval(&mut self, language: Language, source: &str, timeout: Duration) -> Result<Evaluation, RpcError> {
        if source.len() > MAX_EXPRESSION {
            return Err(RpcError::TooLong(source.len()));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let wrapper = wrapper(language);
        let (scanned, _) = self.call("erl_scan", "string", vec![Term::Chars(wrapper.as_bytes().to_vec())], Output::Discard, left()).await?;
        let tokens = match scanned.as_tuple() {
            Some([ok, tokens, _]) if ok.as_atom() == Some("ok") => tokens.clone(),
            _ => return Err(unexpected("erl_scan:string", &scanned)),
        };
        let (parsed, _) = self.call("erl_parse", "parse_exprs", vec![tokens], Output::Discard, left()).await?;
        let exprs = match parsed.as_tuple() {
            Some([ok, exprs]) if ok.as_atom() == Some("ok") => exprs.clone(),
            _ => return Err(unexpected("erl_parse:parse_exprs", &parsed)),
        };
        let bindings = Term::list(vec![Term::tuple(vec![Term::atom(SOURCE_VARIABLE), Term::Binary(source.as_bytes().to_vec())])]);
        let (value, output) = self.call("erl_eval", "exprs", vec![exprs, bindings], Output::Capture, left()).await?;
        let result = match value.as_tuple() {
            Some([v, result, _]) if v.as_atom() == Some("value") => result,
            _ => return Err(unexpected("erl_eval:exprs", &value)),
        };
        let text = |t: &Term| t.as_bytes().map(|b| String::from_utf8_lossy(&b).into_owned());
        let outcome = match result.as_tuple() {
            Some([ok, v]) if ok.as_atom() == Some("ok") => Outcome::Value(text(v).ok_or_else(|| unexpected("the wrapper", result))?),
            Some([e, kind, msg]) if e.as_atom() == Some("error") => {
                let msg = text(msg).ok_or_else(|| unexpected("the wrapper", result))?;
                match kind.as_atom() {
                    Some("parse") => Outcome::ParseError(msg),
                    Some("exception") => Outcome::Raised(msg),
                    Some("no_elixir") => return Err(RpcError::NoElixir(self.node().name.clone())),
                    _ => return Err(unexpected("the wrapper", result)),
                }
            }
            _ => return Err(unexpected("the wrapper", result)),
        };
        let mut output = output;
        let output_cut = output.len() > MAX_PRINTED;
        output.truncate(MAX_PRINTED);
        Ok(Evaluation { output, output_cut, outcome })
    }

    /// Asks the node whether it runs Elixir and has IEx.
    pub async fn runtime(&mut self, timeout: Duration) -> Result<Runtime, RpcError> {
        let elixir = self.loadable("Elixir.Kernel", timeout).await?;
        let iex = self.loadable("Elixir.IEx", timeout).await?;
        Ok(Runtime { elixir, iex })
    }

    /// `code:which(Module)` names a file (or `preloaded`/`cover_compiled`), not `non_existing`.
    async fn loadable(&mut self, module: &str, timeout: Duration) -> Result<bool, RpcError> {
        let (t, _) = self.call("code", "which", vec![Term::atom(module)], Output::Discard, timeout).await?;
        Ok(t.as_atom() != Some("non_existing"))
    }

    /// Closes the connection.
    pub async fn close(self) {
        self.conn.close().await;
    }
}

fn unexpected(call: &str, answer: &Term) -> RpcError {
    RpcError::Unexpected { call: call.into(), answer: clip(&answer.to_string()) }
}

fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(300).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// The wrapper's variable bound to the expression's text (a UTF-8 binary).
pub const SOURCE_VARIABLE: &str = "BeamredirSource";

/// The Erlang text of the wrapper; the expression is bound to [`SOURCE_VARIABLE`].
pub fn wrapper(language: Language) -> &'static str {
    match language {
        Language::Erlang => ERLANG_WRAPPER,
        Language::Elixir => ELIXIR_WRAPPER,
    }
}

/// Scans, parses and evaluates Erlang text; a missing final `.` is added (after a newline, so
/// a trailing comment cannot swallow it).
const ERLANG_WRAPPER: &str = r#"(fun() ->
  Src0 = unicode:characters_to_list(BeamredirSource),
  Src = case lists:reverse(string:trim(Src0, trailing)) of
          [$. | _] -> Src0;
          _ -> Src0 ++ "\n."
        end,
  Bin = fun(Chars) -> unicode:characters_to_binary(Chars) end,
  Loc = fun({L, C}) -> io_lib:format("~w:~w: ", [L, C]);
           (L) when is_integer(L) -> io_lib:format("~w: ", [L]);
           (_) -> "" end,
  Parse = fun(L, Mod, Msg) -> {error, parse, Bin(["* ", Loc(L), Mod:format_error(Msg)])} end,
  Trim = fun(M, _, _) -> lists:member(M, [erl_eval, rpc, erpc]) end,
  Exc = fun(C, R, S) ->
          try erl_error:format_exception(C, R, S, #{stack_trim_fun => Trim})
          catch _:_ -> io_lib:format("exception ~p: ~tp~n  ~tp", [C, R, S])
          end
        end,
  case erl_scan:string(Src) of
    {ok, Toks, _} ->
      case erl_parse:parse_exprs(Toks) of
        {ok, Exprs} ->
          try erl_eval:exprs(Exprs, []) of
            {value, V, _} -> {ok, Bin(io_lib:format("~tp", [V]))}
          catch C:R:S -> {error, exception, Bin(["** ", Exc(C, R, S)])}
          end;
        {error, {L, Mod, Msg}} -> Parse(L, Mod, Msg)
      end;
    {error, {L, Mod, Msg}, _} -> Parse(L, Mod, Msg)
  end
end)()."#;

/// Evaluates Elixir text with `Code.eval_string/1`; syntax errors are parse errors.
const ELIXIR_WRAPPER: &str = r#"(fun() ->
  Src = BeamredirSource,
  case code:ensure_loaded('Elixir.Code') of
    {module, _} ->
      try 'Elixir.Code':eval_string(Src) of
        {V, _} -> {ok, 'Elixir.Kernel':inspect(V, [{pretty, true}])}
      catch C:R:S ->
        Kind = case is_map(R) andalso maps:get('__struct__', R, nil) of
                 'Elixir.SyntaxError' -> parse;
                 'Elixir.TokenMissingError' -> parse;
                 'Elixir.MismatchedDelimiterError' -> parse;
                 _ -> exception
               end,
        {error, Kind, 'Elixir.Exception':format_banner(C, R, S)}
      end;
    _ -> {error, no_elixir, <<>>}
  end
end)()."#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_a_binding_not_wrapper_text() {
        for language in [Language::Erlang, Language::Elixir] {
            let w = wrapper(language);
            assert!(w.contains(SOURCE_VARIABLE), "{w}");
            // The wrapper is fixed text: no expression is ever spliced into it.
            assert!(!w.contains("SOURCE"), "{w}");
        }
    }

    #[test]
    fn exit_codes_and_printing() {
        let e = Evaluation { output: b"hi\n".to_vec(), output_cut: false, outcome: Outcome::Value("[1,2,3]".into()) };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        e.print(&mut out, &mut err).unwrap();
        assert_eq!((out.as_slice(), err.as_slice(), e.exit_code()), (&b"hi\n[1,2,3]\n"[..], &b""[..], 0));
        let e = Evaluation { output: vec![], output_cut: false, outcome: Outcome::Raised("** exception error: bad\n".into()) };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        e.print(&mut out, &mut err).unwrap();
        assert_eq!((out.len(), err.as_slice(), e.exit_code()), (0, &b"** exception error: bad\n"[..], 1));
        assert_eq!(Evaluation { output: vec![], output_cut: false, outcome: Outcome::ParseError("x".into()) }.exit_code(), 2);
        let e = Evaluation { output: b"xx".to_vec(), output_cut: true, outcome: Outcome::Value("ok".into()) };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        e.print(&mut out, &mut err).unwrap();
        assert_eq!(out.as_slice(), b"xxok\n");
        assert_eq!(String::from_utf8(err).unwrap(), "beamredir: the node printed more than 16 MiB; the rest was dropped\n");
    }
}
