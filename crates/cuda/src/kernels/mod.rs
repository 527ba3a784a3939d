//! The CUDA C sources of every kernel, grouped into NVRTC modules.
//!
//! Each module is compiled as one translation unit: the shared [`prelude`], the attention core
//! where needed, then the module body. The CUDA C lives in real files, `cu/<submodule>.cu`, so
//! editors and formatters see it; each submodule here embeds its file with `include_str!`. Only
//! `cu/prelude.cu` stands alone: the others are fragments that rely on the parts concatenated
//! before them (their header comments say which). Sources are plain strings so they exist (and
//! are checked by tests) whether or not the `cuda` feature is on; the runtime compiles them per
//! device architecture and caches the PTX.

pub mod attn_core;
pub mod decode;
pub mod elementwise;
pub mod merge;
pub mod prefill;
pub mod prefill_tc;
pub mod prelude;

/// One NVRTC translation unit: its name, its source parts in order, and its entry points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelModule {
    /// Module name (also the NVRTC program name and the cache key).
    pub name: &'static str,
    /// Source fragments, concatenated in order.
    pub parts: &'static [&'static str],
    /// `extern "C"` kernels the module defines.
    pub entries: &'static [&'static str],
}

impl KernelModule {
    /// The complete CUDA C source of the module.
    pub fn source(&self) -> String {
        self.parts.concat()
    }
}

/// Prefill attention.
pub const PREFILL: KernelModule = KernelModule {
    name: "tessera_prefill",
    parts: &[prelude::SOURCE, attn_core::SOURCE, prefill::SOURCE],
    entries: prefill::ENTRIES,
};

/// Tensor-core prefill attention for head dims 64 and 128 (compute capability 8.0+).
pub const PREFILL_TC: KernelModule = KernelModule {
    name: "tessera_prefill_tc",
    parts: &[prelude::SOURCE, prefill_tc::SOURCE],
    entries: prefill_tc::ENTRIES,
};

/// Split-KV paged decode attention and its combine step.
pub const DECODE: KernelModule = KernelModule {
    name: "tessera_decode",
    parts: &[prelude::SOURCE, attn_core::SOURCE, decode::SOURCE],
    entries: decode::ENTRIES,
};

/// Ring-attention (O, LSE) merge and the final cast.
pub const MERGE: KernelModule = KernelModule {
    name: "tessera_merge",
    parts: &[prelude::SOURCE, merge::SOURCE],
    entries: merge::ENTRIES,
};

/// RMSNorm, RoPE, SwiGLU, embedding gather, residual add.
pub const ELEMENTWISE: KernelModule = KernelModule {
    name: "tessera_elementwise",
    parts: &[prelude::SOURCE, elementwise::SOURCE],
    entries: elementwise::ENTRIES,
};

/// Every module; the PTX test compiles each of them.
pub const ALL: &[KernelModule] = &[PREFILL, PREFILL_TC, DECODE, MERGE, ELEMENTWISE];

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// Every source fragment, with the file it comes from.
    const FRAGMENTS: [(&str, &str); 7] = [
        ("prelude.cu", prelude::SOURCE),
        ("attn_core.cu", attn_core::SOURCE),
        ("prefill.cu", prefill::SOURCE),
        ("prefill_tc.cu", prefill_tc::SOURCE),
        ("decode.cu", decode::SOURCE),
        ("merge.cu", merge::SOURCE),
        ("elementwise.cu", elementwise::SOURCE),
    ];

    /// `src` without `//` and `/* */` comments (string and character literals kept), with
    /// backslash-newline line continuations joined, as the C preprocessor sees it.
    fn preprocess_lines(src: &str) -> String {
        let mut out = String::with_capacity(src.len());
        let mut chars = src.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '/' if chars.peek() == Some(&'/') => {
                    if chars.by_ref().any(|c| c == '\n') {
                        out.push('\n');
                    }
                }
                '/' if chars.peek() == Some(&'*') => {
                    chars.next();
                    let mut prev = ' ';
                    for c in chars.by_ref() {
                        if prev == '*' && c == '/' {
                            break;
                        }
                        prev = c;
                    }
                    out.push(' ');
                }
                '"' | '\'' => {
                    out.push(c);
                    while let Some(d) = chars.next() {
                        out.push(d);
                        if d == '\\' {
                            out.extend(chars.next());
                        } else if d == c {
                            break;
                        }
                    }
                }
                _ => out.push(c),
            }
        }
        out.replace("\\\n", " ")
    }

    fn is_ident(c: char) -> bool {
        c.is_ascii_alphanumeric() || c == '_'
    }

    /// Index just past the parenthesis that closes the one at `open`.
    fn close_paren(s: &str, open: usize) -> usize {
        let mut depth = 0;
        for (i, c) in s[open..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return open + i + 1;
                    }
                }
                _ => {}
            }
        }
        panic!("unbalanced parentheses in {:?}", &s[open..]);
    }

    /// Names of the `extern "C" __global__` functions written out in `code`.
    fn global_names(code: &str) -> Vec<String> {
        const GLOBAL: &str = "extern \"C\" __global__ void";
        let mut names = Vec::new();
        for (at, _) in code.match_indices(GLOBAL) {
            let mut rest = code[at + GLOBAL.len()..].trim_start();
            if rest.starts_with("__launch_bounds__") {
                let open = rest.find('(').expect("__launch_bounds__(");
                rest = rest[close_paren(rest, open)..].trim_start();
            }
            let end = rest.find(|c| !is_ident(c)).unwrap_or(rest.len());
            names.push(rest[..end].to_owned());
        }
        names
    }

    /// Arguments of every invocation `name(...)` of a function-like macro in `code`, split at
    /// top-level commas as the preprocessor does.
    fn invocations(code: &str, name: &str) -> Vec<Vec<String>> {
        let mut calls = Vec::new();
        for (at, _) in code.match_indices(&format!("{name}(")) {
            if code[..at].ends_with(is_ident) {
                continue;
            }
            let open = at + name.len();
            let inner = &code[open + 1..close_paren(code, open) - 1];
            let (mut args, mut depth, mut start) = (Vec::new(), 0, 0);
            for (i, c) in inner.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        args.push(inner[start..i].trim().to_owned());
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            args.push(inner[start..].trim().to_owned());
            calls.push(args);
        }
        calls
    }

    /// The `extern "C" __global__` kernels `src` defines, written out directly or through a
    /// function-like macro whose body defines a kernel named by one of its parameters.
    fn defined_kernels(src: &str) -> Vec<String> {
        let text = preprocess_lines(src);
        let mut code = String::new();
        let mut macros: HashMap<String, Vec<usize>> = HashMap::new();
        for line in text.lines() {
            let Some(def) = line.trim_start().strip_prefix("#define ") else {
                code.push_str(line);
                code.push('\n');
                continue;
            };
            let def = def.trim_start();
            let name_end = def.find(|c| !is_ident(c)).unwrap_or(def.len());
            if !def[name_end..].starts_with('(') {
                continue; // object-like macro
            }
            let params_end = close_paren(def, name_end);
            let params: Vec<&str> = def[name_end + 1..params_end - 1]
                .split(',')
                .map(str::trim)
                .collect();
            let kernel_params = global_names(&def[params_end..])
                .iter()
                .map(|k| {
                    params
                        .iter()
                        .position(|p| p == k)
                        .expect("kernel name is a parameter")
                })
                .collect::<Vec<_>>();
            if !kernel_params.is_empty() {
                macros.insert(def[..name_end].to_owned(), kernel_params);
            }
        }
        let mut kernels = global_names(&code);
        for (name, kernel_params) in &macros {
            for args in invocations(&code, name) {
                kernels.extend(kernel_params.iter().map(|&i| args[i].clone()));
            }
        }
        kernels
    }

    /// Ensures that the kernels each assembled module defines as `extern "C" __global__`
    /// (directly or through an entry macro) are exactly its declared entry points, each once,
    /// and that no entry point is declared by two modules.
    #[test]
    fn entries_are_exactly_the_defined_kernels() {
        let mut seen = HashSet::new();
        for m in ALL {
            for e in m.entries {
                assert!(seen.insert(*e), "{e} declared twice");
            }
            let mut defined = defined_kernels(&m.source());
            defined.sort();
            let mut declared: Vec<String> = m.entries.iter().map(|e| (*e).to_owned()).collect();
            declared.sort();
            assert_eq!(defined, declared, "kernels of {}", m.name);
        }
    }

    /// Ensures that the parser above sees through both entry-macro shapes and comments.
    #[test]
    fn defined_kernels_parses_macros() {
        let src = "// extern \"C\" __global__ void commented_out(\n\
            #define E(NAME, T) \\\n\
            extern \"C\" __global__ void __launch_bounds__(4 * 32) NAME(int x) { f<T>(x); }\n\
            #define TWO(A, B, P) extern \"C\" __global__ void A P {} \\\n\
            extern \"C\" __global__ void B P {}\n\
            E(k1, F16)\nTWO(k2, k3, (int x, int y))\n\
            extern \"C\" __global__ void k4(int x) {}\n";
        let mut k = defined_kernels(src);
        k.sort();
        assert_eq!(k, ["k1", "k2", "k3", "k4"]);
    }

    /// Ensures that every `.cu` file starts with a header comment saying it is compiled by
    /// NVRTC (fragments: that they are not standalone and need the prelude), and that every
    /// module puts the prelude first and the attention core, where used, right after it.
    #[test]
    fn fragments_have_headers_and_prelude_comes_first() {
        for (file, src) in FRAGMENTS {
            let header: String = src.lines().take_while(|l| l.starts_with("//")).collect();
            assert!(
                header.contains("NVRTC"),
                "{file}: header does not mention NVRTC"
            );
            if file != "prelude.cu" {
                assert!(
                    header.contains("Not a standalone translation unit")
                        && header.contains("after prelude.cu"),
                    "{file}: header does not say it is a fragment that needs the prelude"
                );
            }
        }
        for m in ALL {
            assert_eq!(m.parts[0], prelude::SOURCE, "{}: prelude not first", m.name);
            if m.parts.contains(&attn_core::SOURCE) {
                assert_eq!(m.parts[1], attn_core::SOURCE, "{}", m.name);
            }
        }
    }

    /// Ensures that module names are unique (they are the PTX cache keys).
    #[test]
    fn module_names_unique() {
        let names: HashSet<_> = ALL.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), ALL.len());
    }
}
