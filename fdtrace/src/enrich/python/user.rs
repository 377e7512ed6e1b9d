//! Which frame of a Python stack is the user's own code: the first one,
//! innermost first, whose file is outside the interpreter's standard library
//! and outside any installed package; and the library call it made.
use std::path::{Path, PathBuf};

use super::{code::SymFrame, layout::Version};

/// The standard library's directories, derived from where the interpreter's
/// binary is: `<prefix>/lib/libpython3.X.so`, `<prefix>/lib/<multiarch>/...`
/// or `<prefix>/bin/python3.X` all give `<prefix>/lib/python3.X` (and
/// lib64, where some distributions put the compiled half), as CPython's own
/// getpath derives `sys.base_prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Libraries {
    stdlib: Vec<PathBuf>,
}

/// The first frame of the user's code, and the library call from it that
/// led to the fd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFrame {
    /// "fetch_data_wrong (/srv/agent.py:12)"
    pub frame: String,
    /// "httpx AsyncClient.get": the outermost library frame called from the
    /// user frame; None when the user's code made the call itself.
    pub via: Option<String>,
}

impl std::fmt::Display for UserFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.via {
            Some(via) => write!(f, "{} via {via}", self.frame),
            None => f.write_str(&self.frame),
        }
    }
}

impl Libraries {
    pub fn new(binary: &Path, v: Version) -> Self {
        let mut prefix = binary.parent().unwrap_or(Path::new("/"));
        let name = |p: &Path| p.file_name().and_then(|n| n.to_str()).map(str::to_owned);
        match name(prefix).as_deref() {
            Some("bin" | "lib" | "lib64") => prefix = prefix.parent().unwrap_or(prefix),
            // <prefix>/lib/x86_64-linux-gnu/libpython3.X.so
            _ if prefix
                .parent()
                .and_then(name)
                .is_some_and(|n| n == "lib" || n == "lib64") =>
            {
                prefix = prefix.parent().and_then(Path::parent).unwrap_or(prefix)
            }
            _ => {}
        }
        let dir = format!("python{}.{}", v.major(), v.minor());
        Libraries {
            stdlib: vec![
                prefix.join("lib").join(&dir),
                prefix.join("lib64").join(&dir),
            ],
        }
    }

    /// The part of `file` inside a library root (the standard library,
    /// a site-packages or dist-packages directory), or None for the user's
    /// code. Frozen modules (`<frozen importlib._bootstrap>`) are the
    /// standard library's.
    fn library_path<'a>(&self, file: &'a str) -> Option<&'a str> {
        if let Some(frozen) = file
            .strip_prefix("<frozen ")
            .and_then(|f| f.strip_suffix('>'))
        {
            return Some(frozen);
        }
        // Packages first: <stdlib>/site-packages/x is package x.
        for dir in ["/site-packages/", "/dist-packages/"] {
            if let Some(i) = file.rfind(dir) {
                return Some(&file[i + dir.len()..]);
            }
        }
        self.stdlib.iter().find_map(|root| {
            let rest = Path::new(file).strip_prefix(root).ok()?;
            // strip_prefix matched whole components: slice the same tail.
            let tail = rest.to_str()?;
            Some(&file[file.len() - tail.len()..])
        })
    }

    /// The module a library file belongs to, as its users import it:
    /// dotted, up to its first private part (`httpx/_client.py` is
    /// "httpx", `http/client.py` "http.client", `logging/__init__.py`
    /// "logging"; frozen modules keep their name).
    pub fn module(&self, file: &str) -> Option<String> {
        let rel = self.library_path(file)?;
        if file.starts_with("<frozen ") {
            return Some(rel.to_string());
        }
        let rel = rel.strip_suffix(".py").unwrap_or(rel);
        let parts: Vec<&str> = rel
            .split('/')
            .filter(|p| *p != "__init__")
            .take_while(|p| !p.starts_with('_'))
            .collect();
        if parts.is_empty() {
            // A private top-level module (_pytest, _strptime): its own name.
            return rel.split('/').next().map(str::to_owned);
        }
        Some(parts.join("."))
    }

    /// How many of `frames` are the user's own code.
    pub fn user_frames(&self, frames: &[SymFrame]) -> usize {
        frames
            .iter()
            .filter(|f| matches!(f, SymFrame::Code { file, .. } if self.module(file).is_none()))
            .count()
    }

    /// The user's frame in `frames` (innermost first) and the library call
    /// it made. Frames whose code could not be read belong to no one and
    /// are passed over.
    pub fn user_frame(&self, frames: &[SymFrame]) -> Option<UserFrame> {
        let mut via = None;
        for f in frames {
            let SymFrame::Code { qualname, file, .. } = f else {
                continue;
            };
            match self.module(file) {
                Some(module) => via = Some(format!("{module} {qualname}")),
                None => {
                    return Some(UserFrame {
                        frame: f.to_string(),
                        via,
                    });
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V312: Version = Version(0x030c01f0);

    impl Libraries {
        fn is_library(&self, file: &str) -> bool {
            self.library_path(file).is_some()
        }
    }

    fn code(qualname: &str, file: &str, line: u32) -> SymFrame {
        SymFrame::Code {
            qualname: qualname.into(),
            file: file.into(),
            line: Some(line),
        }
    }

    #[test]
    fn prefixes_from_binaries() {
        let pyenv = Libraries::new(
            Path::new("/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0"),
            V312,
        );
        assert!(pyenv.is_library("/root/.pyenv/versions/3.12.1/lib/python3.12/socket.py"));
        assert!(!pyenv.is_library("/root/.pyenv/versions/3.12.1/lib/python3.12x/socket.py"));
        let debian = Libraries::new(Path::new("/usr/bin/python3.12"), V312);
        assert!(debian.is_library("/usr/lib/python3.12/asyncio/streams.py"));
        assert!(debian.is_library("/usr/lib/python3/dist-packages/requests/api.py"));
        assert!(!debian.is_library("/usr/lib/python3.11/socket.py"));
        let multiarch = Libraries::new(
            Path::new("/usr/lib/x86_64-linux-gnu/libpython3.12.so.1.0"),
            V312,
        );
        assert!(multiarch.is_library("/usr/lib/python3.12/socket.py"));
        assert!(debian.is_library("<frozen importlib._bootstrap>"));
        assert!(debian.is_library("/srv/app/.venv/lib/python3.12/site-packages/httpx/_client.py"));
        assert!(!debian.is_library("/srv/agent.py"));
        assert!(!debian.is_library("<string>"));
    }

    #[test]
    fn module_names() {
        let l = Libraries::new(Path::new("/usr/bin/python3.12"), V312);
        let m = |f: &str| l.module(f);
        assert_eq!(
            m("/v/lib/python3.12/site-packages/httpx/_client.py").as_deref(),
            Some("httpx")
        );
        assert_eq!(
            m("/v/lib/python3.12/site-packages/anyio/_core/_sockets.py").as_deref(),
            Some("anyio")
        );
        assert_eq!(
            m("/usr/lib/python3.12/http/client.py").as_deref(),
            Some("http.client")
        );
        assert_eq!(
            m("/usr/lib/python3.12/logging/__init__.py").as_deref(),
            Some("logging")
        );
        assert_eq!(
            m("/usr/lib/python3.12/_strptime.py").as_deref(),
            Some("_strptime")
        );
        assert_eq!(
            m("<frozen importlib._bootstrap>").as_deref(),
            Some("importlib._bootstrap")
        );
        assert_eq!(m("/srv/agent.py"), None);
    }

    #[test]
    fn user_frame_and_the_library_call_it_made() {
        let l = Libraries::new(Path::new("/usr/bin/python3.12"), V312);
        let site = "/srv/.venv/lib/python3.12/site-packages";
        let frames = vec![
            code("socket.__init__", "/usr/lib/python3.12/socket.py", 232),
            SymFrame::Unreadable(0x7f00),
            code(
                "connect_tcp",
                &format!("{site}/anyio/_core/_sockets.py"),
                190,
            ),
            code("AsyncClient.get", &format!("{site}/httpx/_client.py"), 1801),
            code("fetch_data_wrong", "/srv/agent.py", 12),
            code("main", "/srv/agent.py", 30),
        ];
        let u = l.user_frame(&frames).unwrap();
        assert_eq!(
            u.to_string(),
            "fetch_data_wrong (/srv/agent.py:12) via httpx AsyncClient.get"
        );

        // The user's code called open() itself: a builtin, no Python frame.
        let u = l.user_frame(&frames[4..]).unwrap();
        assert_eq!(u.to_string(), "fetch_data_wrong (/srv/agent.py:12)");

        // Nothing but library code: no user frame.
        assert_eq!(l.user_frame(&frames[..4]), None);
        assert_eq!(l.user_frames(&frames), 2);
        assert_eq!(l.user_frames(&frames[..4]), 0);
    }
}
