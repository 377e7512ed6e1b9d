//! Python call sites of traced processes: which processes run a supported
//! CPython (their layout goes to the kernel, which then takes a Python
//! stack with each fd's native one), the once-only notice for the others,
//! and each fd's Python site: its stack symbolized, its user frame, and the
//! key that groups fds into sites.
//!
//! An fd carries up to two Python stacks: the one that created it and, for
//! sockets, the one of its first use (the first send). The creation stack
//! names the site unless the first-use stack holds more of the user's code:
//! httpx creates its sockets in a helper task, whose stack holds the event
//! loop, the library and of the user's code only the `<module>` or `main`
//! that started the loop; the first send comes from the user's request, in
//! the task of the function that made it.
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    rc::Rc,
    time::{Duration, Instant},
};

use fdtrace_common::python::{NO_PY_STACK, PY_USE_UNSAMPLED, PyFrame, PyLayout, PyStack};

use super::{PyProc, UserFrame, locate};
use crate::analysis::{PythonFrames, PythonSite};

/// How long after exec a process whose executable needs libpython is
/// looked at again, and how often: the loader maps libpython within
/// milliseconds; past this the process is taken as not Python.
const PENDING_FOR: Duration = Duration::from_secs(2);
const RETRY_EVERY: Duration = Duration::from_millis(5);

/// A Python stack of one process, symbolized, and the site key it gives
/// its fds.
#[derive(Debug, PartialEq, Eq)]
pub struct PySite {
    pub site: PythonSite,
    /// From the frames' text (fds with the same Python stack, whatever the
    /// instruction offsets behind the lines, are one site), marked apart
    /// from native canonical stacks (bit 63 clear) and from NO_SITE and
    /// SITE_NOT_SAMPLED (bit 62 set).
    pub key: u64,
    /// How many of its frames are the user's own code.
    user_frames: usize,
}

impl PySite {
    pub fn new(frames: Vec<String>, user: Option<UserFrame>, user_frames: usize) -> Self {
        let mut h = DefaultHasher::new();
        frames.hash(&mut h);
        PySite {
            key: (h.finish() >> 2) | (1 << 63),
            user_frames,
            site: Rc::new(PythonFrames {
                stack: frames,
                user_frame: user.as_ref().map(|u| u.frame.clone()),
                via: user.and_then(|u| u.via),
            }),
        }
    }
}

/// The site of an fd from its creation stack and its first-use stack: the
/// first-use stack when it holds more frames of the user's code, else the
/// creation stack (else whichever exists).
pub fn choose(create: Option<Rc<PySite>>, first_use: Option<Rc<PySite>>) -> Option<Rc<PySite>> {
    match (create, first_use) {
        (Some(c), Some(u)) if u.user_frames > c.user_frames => Some(u),
        (c, u) => c.or(u),
    }
}

enum Proc {
    Python {
        // Boxed: far larger than the other states, which most processes
        // (not Python) are in.
        p: Box<PyProc>,
        /// Its stacks symbolized, by kernel id.
        sites: HashMap<u64, Rc<PySite>>,
        /// The same, by site key.
        by_key: HashMap<u64, PythonSite>,
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
    none: HashMap<u64, PythonSite>,
}

impl PySites {
    /// Looks at `pid`, whose image is known to be past its loader (traced
    /// since before node mode started).
    pub fn attach(&mut self, pid: u32) -> Found {
        let (proc, found) = match PyProc::attach(pid) {
            Ok(Some(p)) => {
                let l = p.interp.layout;
                (
                    Proc::Python {
                        p: Box::new(p),
                        sites: HashMap::new(),
                        by_key: HashMap::new(),
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

    /// Looks at `pid`, which may have just run execve (a new image; or
    /// one given with `--pid`, or adopted by node mode, maybe right after
    /// its exec): if it needs a libpython the loader has not mapped yet, it
    /// is looked at again shortly.
    pub fn look_at(&mut self, pid: u32, now: Instant) -> Found {
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
                    p: Box::new(p),
                    sites: HashMap::new(),
                    by_key: HashMap::new(),
                },
                None => Proc::No,
            },
            Some(Proc::Pending { until }) => Proc::Pending { until: *until },
            _ => Proc::No,
        };
        self.procs.insert(child, proc);
    }

    /// Drops what is known of a process that is gone (its summary, made
    /// at its exit, holds the sites it needs).
    pub fn exit(&mut self, pid: u32) {
        self.procs.remove(&pid);
    }

    /// The Python sites of `pid` by key (empty for a process without).
    pub fn sites(&self, pid: u32) -> &HashMap<u64, PythonSite> {
        match self.procs.get(&pid) {
            Some(Proc::Python { by_key, .. }) => by_key,
            _ => &self.none,
        }
    }

    /// The site key of an fd of `pid` from its two Python stack ids (see
    /// [`choose`]); `read` fetches a stack from the kernel's PY_STACKS.
    /// None when the fd has no Python stack.
    pub fn site_key(
        &mut self,
        pid: u32,
        create: u64,
        first_use: u64,
        read: &mut dyn FnMut(u64) -> Option<PyStack>,
    ) -> Option<u64> {
        let c = self.symbolized(pid, create, read);
        let u = self.symbolized(pid, first_use, read);
        let s = choose(c, u)?;
        if let Some(Proc::Python { by_key, .. }) = self.procs.get_mut(&pid) {
            by_key.entry(s.key).or_insert_with(|| s.site.clone());
        }
        Some(s.key)
    }

    fn symbolized(
        &mut self,
        pid: u32,
        id: u64,
        read: &mut dyn FnMut(u64) -> Option<PyStack>,
    ) -> Option<Rc<PySite>> {
        if id == NO_PY_STACK || id == PY_USE_UNSAMPLED {
            return None;
        }
        let Some(Proc::Python { p, sites, .. }) = self.procs.get_mut(&pid) else {
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
        let site = Rc::new(PySite::new(
            syms.iter().map(ToString::to_string).collect(),
            p.user_frame(&syms),
            p.user_frames(&syms),
        ));
        sites.insert(id, site.clone());
        Some(site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack whose frames in /srv are the user's.
    fn site(frames: &[&str]) -> Option<Rc<PySite>> {
        let user: Vec<&&str> = frames.iter().filter(|f| f.contains("(/srv/")).collect();
        Some(Rc::new(PySite::new(
            frames.iter().map(|f| f.to_string()).collect(),
            user.first().map(|u| UserFrame {
                frame: u.to_string(),
                via: None,
            }),
            user.len(),
        )))
    }

    #[test]
    fn the_creation_stack_names_the_site_of_synchronous_code() {
        // http.client: created and first sent in the user's function.
        let c = site(&[
            "create_connection (/usr/lib/python3.12/socket.py:1)",
            "get (/srv/a.py:3)",
        ]);
        let u = site(&[
            "sendall (/usr/lib/python3.12/socket.py:9)",
            "get (/srv/a.py:3)",
        ]);
        assert_eq!(choose(c.clone(), u), c);
        // Created in one user function, first sent from another.
        let c = site(&["connect (/srv/a.py:3)", "main (/srv/a.py:20)"]);
        let u = site(&["handle (/srv/b.py:9)", "main (/srv/a.py:21)"]);
        assert_eq!(choose(c.clone(), u), c);
    }

    #[test]
    fn first_use_names_a_site_created_in_a_helper_task() {
        // httpx through anyio: the helper task's stack holds only the
        // <module> that started the event loop.
        let c = site(&[
            "connect_tcp (/v/site-packages/anyio/x.py:1)",
            "run (/usr/lib/python3.12/asyncio/runners.py:118)",
            "<module> (/srv/agent.py:93)",
        ]);
        let u = site(&[
            "AsyncClient.get (/v/site-packages/httpx/_client.py:1)",
            "fetch_data_wrong (/srv/agent.py:12)",
            "main (/srv/agent.py:80)",
            "run (/usr/lib/python3.12/asyncio/runners.py:118)",
            "<module> (/srv/agent.py:93)",
        ]);
        assert_eq!(choose(c.clone(), u.clone()), u);
        // Only library code when created: the first use, or the creation.
        let lib = site(&["connect_tcp (/v/site-packages/anyio/x.py:1)"]);
        assert_eq!(choose(lib.clone(), u.clone()), u);
        let lib2 = site(&["run (/usr/lib/python3.12/asyncio/x.py:5)"]);
        assert_eq!(choose(lib.clone(), lib2.clone()), lib);
        assert_eq!(choose(None, lib2.clone()), lib2);
        assert_eq!(choose(None, None), None);
    }

    #[test]
    fn same_lines_same_key_apart_from_native_ids() {
        let a = site(&["f (/a.py:1)", "<module> (/a.py:9)"]).unwrap();
        let b = site(&["f (/a.py:1)", "<module> (/a.py:9)"]).unwrap();
        let c = site(&["f (/a.py:2)", "<module> (/a.py:9)"]).unwrap();
        assert_eq!(a.key, b.key);
        assert_ne!(a.key, c.key);
        for k in [a.key, c.key] {
            assert_ne!(k & (1 << 63), 0, "native canonical ids have bit 63 clear");
            assert_ne!(k, fdtrace_common::NO_SITE);
            assert_ne!(k, fdtrace_common::SITE_NOT_SAMPLED);
        }
    }
}
