//! Python call sites of traced processes: which processes run a supported
//! CPython (their layout goes to the kernel, which then takes a Python
//! stack with each fd's native one), the once-only notice for the others,
//! and each fd's Python site: its stack symbolized, its user frame, and the
//! key that groups fds into sites.
//!
//! An fd carries up to two Python stacks: the one that created it and, for
//! sockets, the one of its first use (the first send). The creation stack
//! names the site when it holds some of the user's code; when it does not
//! (httpx creates its sockets in a helper task, where only the event loop
//! and the library are on the stack), the first-use stack does.
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    rc::Rc,
    time::{Duration, Instant},
};

use fdtrace_common::python::{NO_PY_STACK, PyFrame, PyLayout, PyStack};

use super::{PyProc, UserFrame, locate};

/// How long after exec a process whose executable needs libpython is
/// looked at again, and how often: the loader maps libpython within
/// milliseconds; past this the process is taken as not Python.
const PENDING_FOR: Duration = Duration::from_secs(2);
const RETRY_EVERY: Duration = Duration::from_millis(5);

/// A Python stack of one process, symbolized.
#[derive(Debug, PartialEq, Eq)]
pub struct PySite {
    /// "qualname (file:line)", innermost first.
    pub frames: Vec<String>,
    pub user: Option<UserFrame>,
    /// Hash of `frames`: fds with the same Python stack, whatever the
    /// instruction offsets behind the lines, are one site.
    pub key: u64,
}

impl PySite {
    pub fn new(frames: Vec<String>, user: Option<UserFrame>) -> Self {
        let mut h = DefaultHasher::new();
        frames.hash(&mut h);
        PySite {
            key: h.finish(),
            frames,
            user,
        }
    }
}

/// The site of an fd from its creation stack and its first-use stack:
/// the first of them that holds the user's code, else whichever exists.
pub fn choose(create: Option<Rc<PySite>>, first_use: Option<Rc<PySite>>) -> Option<Rc<PySite>> {
    match (create, first_use) {
        (Some(c), _) if c.user.is_some() => Some(c),
        (_, Some(u)) if u.user.is_some() => Some(u),
        (c, u) => c.or(u),
    }
}

enum Proc {
    Python {
        p: PyProc,
        /// Its stacks symbolized, by kernel id.
        sites: HashMap<u64, Rc<PySite>>,
    },
    /// Just exec'd an executable that needs libpython, not mapped yet.
    Pending { until: Instant },
    /// Not a Python, or one whose frames cannot be read (said once).
    No,
}

/// What became of a process looked at.
#[derive(Debug, PartialEq)]
pub enum Found {
    /// A supported CPython: this layout goes to the kernel's PY_LAYOUTS.
    Python(PyLayout),
    /// Its frames cannot be read: the notice to give, once.
    Notice(String),
    /// Not a Python (or not yet known).
    Nothing,
}

#[derive(Default)]
pub struct PySites {
    procs: HashMap<u32, Proc>,
    /// Frames of each kernel stack id (ids are the same for every process).
    stacks: HashMap<u64, Option<Rc<[PyFrame]>>>,
}

impl PySites {
    /// Looks at `pid` (attached to, or started by `run`).
    pub fn attach(&mut self, pid: u32) -> Found {
        let (proc, found) = match PyProc::attach(pid) {
            Ok(Some(p)) => {
                let l = p.interp.layout;
                (
                    Proc::Python {
                        p,
                        sites: HashMap::new(),
                    },
                    Found::Python(l),
                )
            }
            Ok(None) => (Proc::No, Found::Nothing),
            Err(why) => (Proc::No, Found::Notice(why)),
        };
        self.procs.insert(pid, proc);
        found
    }

    /// `pid` ran execve: a new image, looked at again; if it needs a
    /// libpython the loader has not mapped yet, again shortly.
    pub fn exec(&mut self, pid: u32, now: Instant) -> Found {
        if locate::libpython_pending(pid) {
            self.procs.insert(
                pid,
                Proc::Pending {
                    until: now + PENDING_FOR,
                },
            );
            return Found::Nothing;
        }
        self.attach(pid)
    }

    /// When a pending process is next to be looked at.
    pub fn next_retry(&self, now: Instant) -> Option<Instant> {
        self.procs
            .values()
            .any(|p| matches!(p, Proc::Pending { .. }))
            .then(|| now + RETRY_EVERY)
    }

    /// Looks at the pending processes again: those found, or given up.
    pub fn retry(&mut self, now: Instant) -> Vec<(u32, Found)> {
        let pending: Vec<(u32, Instant)> = self
            .procs
            .iter()
            .filter_map(|(&pid, p)| match p {
                Proc::Pending { until } => Some((pid, *until)),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for (pid, until) in pending {
            if now < until && locate::libpython_pending(pid) {
                continue;
            }
            match self.attach(pid) {
                Found::Nothing => {}
                f => out.push((pid, f)),
            }
        }
        out
    }

    /// A followed child: the kernel copied its parent's layout; the child
    /// is read through its own memory. An unsupported parent's notice is
    /// not given again for its children.
    pub fn fork(&mut self, parent: u32, child: u32) {
        let proc = match self.procs.get(&parent) {
            Some(Proc::Python { p, .. }) => match p.fork(child) {
                Some(p) => Proc::Python {
                    p,
                    sites: HashMap::new(),
                },
                None => Proc::No,
            },
            Some(Proc::Pending { until }) => Proc::Pending { until: *until },
            _ => Proc::No,
        };
        self.procs.insert(child, proc);
    }

    pub fn exit(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    pub fn is_python(&self, pid: u32) -> bool {
        matches!(self.procs.get(&pid), Some(Proc::Python { .. }))
    }

    /// The Python site of an fd of `pid` from its two stack ids (see
    /// [`choose`]); `read` fetches a stack from the kernel's PY_STACKS.
    pub fn site(
        &mut self,
        pid: u32,
        create: u64,
        first_use: u64,
        read: &mut dyn FnMut(u64) -> Option<PyStack>,
    ) -> Option<Rc<PySite>> {
        let c = self.symbolized(pid, create, read);
        let u = self.symbolized(pid, first_use, read);
        choose(c, u)
    }

    fn symbolized(
        &mut self,
        pid: u32,
        id: u64,
        read: &mut dyn FnMut(u64) -> Option<PyStack>,
    ) -> Option<Rc<PySite>> {
        if id == NO_PY_STACK {
            return None;
        }
        let Some(Proc::Python { p, sites }) = self.procs.get_mut(&pid) else {
            return None;
        };
        if let Some(s) = sites.get(&id) {
            return Some(s.clone());
        }
        let frames = self
            .stacks
            .entry(id)
            .or_insert_with(|| {
                read(id).map(|s| {
                    let n = (s.len as usize).min(s.frames.len());
                    Rc::from(&s.frames[..n])
                })
            })
            .clone()?;
        let syms: Vec<_> = p.symbolize(&frames).into_iter().map(|(s, _)| s).collect();
        let user = p.user_frame(&syms);
        let site = Rc::new(PySite::new(
            syms.iter().map(ToString::to_string).collect(),
            user,
        ));
        sites.insert(id, site.clone());
        Some(site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(frames: &[&str], user: Option<&str>) -> Option<Rc<PySite>> {
        Some(Rc::new(PySite::new(
            frames.iter().map(|f| f.to_string()).collect(),
            user.map(|u| UserFrame {
                frame: u.into(),
                via: None,
            }),
        )))
    }

    #[test]
    fn creation_stack_with_user_code_names_the_site() {
        let c = site(&["open_a (/srv/a.py:3)"], Some("open_a (/srv/a.py:3)"));
        let u = site(&["send (/srv/b.py:9)"], Some("send (/srv/b.py:9)"));
        assert_eq!(choose(c.clone(), u), c);
    }

    #[test]
    fn first_use_names_a_site_created_in_library_code_only() {
        let c = site(&["connect_tcp (/v/site-packages/anyio/x.py:1)"], None);
        let u = site(
            &["fetch_data_wrong (/srv/agent.py:12)"],
            Some("fetch_data_wrong (/srv/agent.py:12)"),
        );
        assert_eq!(choose(c.clone(), u.clone()), u);
        // Neither holds user code: the creation stack, then the first use.
        let u2 = site(&["run (/usr/lib/python3.12/asyncio/x.py:5)"], None);
        assert_eq!(choose(c.clone(), u2.clone()), c);
        assert_eq!(choose(None, u2.clone()), u2);
        assert_eq!(choose(None, None), None);
    }

    #[test]
    fn same_lines_same_key() {
        let a = site(&["f (/a.py:1)", "<module> (/a.py:9)"], None).unwrap();
        let b = site(&["f (/a.py:1)", "<module> (/a.py:9)"], None).unwrap();
        let c = site(&["f (/a.py:2)", "<module> (/a.py:9)"], None).unwrap();
        assert_eq!(a.key, b.key);
        assert_ne!(a.key, c.key);
    }
}
