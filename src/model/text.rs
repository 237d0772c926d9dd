//! Training examples from a data file and their tokenization with the model's `tokenizer.json`.
//!
//! - `.txt`: one example per line.
//! - `.jsonl`: one JSON object per line, with a string field `text` (or the `--text-field` key),
//!   or string fields `prompt` and `completion`: the model sees `prompt + completion`, and the
//!   prompt's tokens get label -100 (left out of the statistics under `use_label_mask`), as in
//!   completion-only supervised fine-tuning.
//!
//! Blank lines (and examples whose text is blank) are skipped. Special tokens are added as the
//! tokenizer's post-processor adds them; sequences are truncated to the maximum length.

use crate::{Error, Result};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use tokenizers::{Tokenizer, TruncationParams};

thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside a library call whose panics eva turns into errors (loading a
/// tokenizer): a panic hook should stay quiet then, the error says what happened.
pub fn panic_is_guarded() -> bool {
    GUARDED.with(|g| g.get())
}

/// One training example.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Plain text; every token counts.
    Text(String),
    /// A prompt (label-masked) followed by its completion.
    Pair { prompt: String, completion: String },
}

/// The examples of a data file, in file order, with their 1-based line numbers.
#[derive(Clone, Debug)]
pub struct Examples {
    pub path: PathBuf,
    pub items: Vec<Example>,
    pub lines: Vec<usize>,
}

/// Reads `.txt` or `.jsonl`; `text_field` names the JSON key of plain text (`None`: `text`,
/// falling back to `prompt` + `completion`).
pub fn read_examples(path: &Path, text_field: Option<&str>) -> Result<Examples> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let jsonl = match ext.as_str() {
        "txt" | "text" => false,
        "jsonl" => true,
        _ => {
            return Err(Error::usage(format!(
                "--data {}: expected a .txt file (one example per line) or a .jsonl file (one JSON object per line)",
                path.display()
            )))
        }
    };
    if text_field.is_some() && !jsonl {
        return Err(Error::usage(format!(
            "--text-field applies to .jsonl data, but {} is a text file",
            path.display()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io("cannot read data file", path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let line = 1 + e.as_bytes()[..e.utf8_error().valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        Error::data(format!("{}:{line}: not valid UTF-8", path.display()))
    })?;
    let mut items = Vec::new();
    let mut lines = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let ex = if jsonl {
            parse_json_line(path, i + 1, line, text_field)?
        } else {
            Example::Text(line.to_string())
        };
        let blank = match &ex {
            Example::Text(t) => t.trim().is_empty(),
            Example::Pair { prompt, completion } => {
                prompt.trim().is_empty() && completion.trim().is_empty()
            }
        };
        if !blank {
            items.push(ex);
            lines.push(i + 1);
        }
    }
    if items.is_empty() {
        return Err(Error::data(format!(
            "data file {} holds no examples (every line is blank)",
            path.display()
        )));
    }
    Ok(Examples {
        path: path.to_path_buf(),
        items,
        lines,
    })
}

fn parse_json_line(
    path: &Path,
    line_no: usize,
    line: &str,
    text_field: Option<&str>,
) -> Result<Example> {
    let at = || format!("{}:{line_no}", path.display());
    let v: serde_json::Value = serde_json::from_str(line)
        .map_err(|e| Error::data(format!("{}: not valid JSON: {e}", at())))?;
    let Some(obj) = v.as_object() else {
        return Err(Error::data(format!(
            "{}: expected a JSON object, found {}",
            at(),
            json_kind(&v)
        )));
    };
    let string = |key: &str| -> Result<Option<String>> {
        match obj.get(key) {
            None => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(Error::data(format!(
                "{}: field `{key}` must be a string, found {}",
                at(),
                json_kind(other)
            ))),
        }
    };
    let field = text_field.unwrap_or("text");
    if let Some(t) = string(field)? {
        return Ok(Example::Text(t));
    }
    if text_field.is_none() {
        if let (Some(prompt), Some(completion)) = (string("prompt")?, string("completion")?) {
            return Ok(Example::Pair { prompt, completion });
        }
    }
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    let want = if text_field.is_some() {
        format!("a string field `{field}` (--text-field)")
    } else {
        "a string field `text`, or string fields `prompt` and `completion` (or name the text key with --text-field)".to_string()
    };
    Err(Error::data(format!(
        "{}: expected {want}; found keys: {}",
        at(),
        if keys.is_empty() {
            "none".into()
        } else {
            keys.join(", ")
        }
    )))
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// One tokenized example.
#[derive(Clone, Debug, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    /// `false` where the token's label is -100 (prompt tokens, and special tokens before the
    /// first completion token).
    pub labelled: Vec<bool>,
}

/// The model's tokenizer, truncating to a maximum length and never padding.
pub struct TextEncoder {
    tokenizer: Tokenizer,
    /// Maximum tokens per sequence, special tokens included.
    pub max_len: usize,
}

impl TextEncoder {
    /// Loads `dir/tokenizer.json`.
    pub fn open(dir: &Path, max_len: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::data(format!(
                "model directory {} has no tokenizer.json (eva tokenizes with the model's fast tokenizer; write one with \
                 transformers.AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))",
                dir.display()
            )));
        }
        // The tokenizers library panics on some malformed files (an unwrap in its decoder's
        // deserializer, found by tests/suite/fuzz.rs): a panic is a refusal like any other.
        GUARDED.with(|g| g.set(true));
        let loaded = std::panic::catch_unwind(|| Tokenizer::from_file(&path));
        GUARDED.with(|g| g.set(false));
        let loaded = loaded.unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(format!("malformed tokenizer.json ({why})").into())
        });
        let mut tokenizer = loaded.map_err(|e| {
            Error::data(format!(
                "{}: cannot load the tokenizer: {e}",
                path.display()
            ))
        })?;
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_len,
                ..Default::default()
            }))
            .map_err(|e| {
                Error::data(format!(
                    "{}: cannot set truncation to {max_len} tokens: {e}",
                    path.display()
                ))
            })?;
        tokenizer.with_padding(None);
        Ok(TextEncoder { tokenizer, max_len })
    }

    /// Tokenizes one example (`what` names it in errors). A long example is tokenized by
    /// prefixes ([`TextEncoder::encode_text`]), so its cost follows `max_len`, not its length.
    pub fn encode(&self, ex: &Example, what: impl Fn() -> String) -> Result<Encoded> {
        let fail =
            |e: tokenizers::Error| Error::data(format!("{}: tokenization failed: {e}", what()));
        match ex {
            Example::Text(t) => {
                let enc = self.encode_text(&[t]).map_err(fail)?;
                Ok(Encoded {
                    ids: enc.get_ids().to_vec(),
                    type_ids: enc.get_type_ids().to_vec(),
                    labelled: vec![true; enc.get_ids().len()],
                })
            }
            Example::Pair { prompt, completion } => {
                let enc = self.encode_text(&[prompt, completion]).map_err(fail)?;
                // Byte offsets: a token belongs to the prompt when it ends inside it.
                let mut seen_completion = false;
                let labelled = enc
                    .get_offsets()
                    .iter()
                    .zip(enc.get_special_tokens_mask())
                    .map(|(&(_, end), &special)| {
                        if special == 1 {
                            seen_completion
                        } else if end <= prompt.len() {
                            false
                        } else {
                            seen_completion = true;
                            true
                        }
                    })
                    .collect();
                Ok(Encoded {
                    ids: enc.get_ids().to_vec(),
                    type_ids: enc.get_type_ids().to_vec(),
                    labelled,
                })
            }
        }
    }

    /// Tokenizes the concatenation of `parts`, truncated to `max_len`, with the same result as
    /// tokenizing the whole text but without tokenizing more than a few times the bytes that the
    /// kept tokens need.
    ///
    /// A text up to [`TextEncoder::whole_text_bytes`] is tokenized whole. A longer one is cut
    /// just after whitespace (within the last half of the cut, so words stay whole); the cut
    /// prefix is accepted when it fills `max_len` tokens and a prefix twice as long gives the
    /// same ids (a cut can only change the tokens next to it, and those were truncated away);
    /// otherwise the cut doubles. The tokenizers library would tokenize the whole text and keep
    /// every overflowing window (~470 MB for one 5 MiB line).
    pub fn encode_text(&self, parts: &[&str]) -> tokenizers::Result<tokenizers::Encoding> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        // The first `n` bytes of the text, `n` moved back to a character boundary and then to
        // just after whitespace in the last half.
        let prefix = |n: usize| -> Cow<'_, str> {
            let mut out = Cow::Borrowed("");
            let mut left = n;
            for p in parts {
                let mut take = left.min(p.len());
                while !p.is_char_boundary(take) {
                    take -= 1;
                }
                out = if out.is_empty() {
                    Cow::Borrowed(&p[..take])
                } else {
                    Cow::Owned(format!("{out}{}", &p[..take]))
                };
                left -= take;
                if take < p.len() {
                    break;
                }
            }
            let mut half = out.len() / 2;
            while !out.is_char_boundary(half) {
                half -= 1;
            }
            let end = out[half..]
                .char_indices()
                .rfind(|(_, c)| c.is_whitespace())
                .map(|(i, c)| half + i + c.len_utf8());
            match (end, out) {
                (Some(e), Cow::Borrowed(s)) => Cow::Borrowed(&s[..e]),
                (Some(e), Cow::Owned(s)) => Cow::Owned(s[..e].to_string()),
                (None, out) => out,
            }
        };
        let mut cut = self.whole_text_bytes();
        let mut shorter: Option<tokenizers::Encoding> = None;
        while cut < len {
            let mut enc = self.tokenizer.encode(prefix(cut), true)?;
            // Overflowing windows are not needed (and are what costs memory).
            enc.take_overflowing();
            let full = enc.get_ids().len() >= self.max_len;
            if let Some(prev) = shorter.take() {
                if full && prev.get_ids() == enc.get_ids() {
                    return Ok(prev);
                }
            }
            if full {
                shorter = Some(enc);
            }
            cut = cut.saturating_mul(2);
        }
        let whole = if parts.len() == 1 {
            Cow::Borrowed(parts[0])
        } else {
            Cow::Owned(parts.concat())
        };
        self.tokenizer.encode(whole, true)
    }

    /// Texts up to this many bytes are tokenized whole: 8 bytes per kept token (English averages
    /// about 4 per token), at least 4 KiB.
    pub fn whole_text_bytes(&self) -> usize {
        self.max_len.saturating_mul(8).max(4096)
    }
}
