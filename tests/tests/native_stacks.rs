//! Native call-site stacks: no frame that is not on the stack, no frame under
//! a wrong name.
//!
//! The known chain: tests/native/stk_main.c's `leak_through_lib` calls
//! `stk_open_leak`, exported by libstk (tests/native/stk_lib.c), which calls
//! the static `stk_hidden_open`, which calls libc's `open`. libstk is built
//! without frame pointers and stripped: the static function has no symbol
//! left, and the kernel's frame-pointer walk cannot get through the library
//! (nor through libc's open, which keeps the path in RBP). The test traces
//! stk_main with `fdtrace --json run` and checks the stack of the site of the
//! file it leaks, frame by frame, against the chain: the static function's
//! frame is `libstk.so+0xOFFSET` inside that function (read from the
//! unstripped build), never the exported function laid out before it; each
//! caller is named at the line of its call; and nothing else is in the
//! stack (no stale return address left on the stack taken for a frame, no
//! frame twice).
//!
//! Then real Python programs (tests/leakers/logging_leak.py and
//! sqlite_leak.py), whose interpreter and libsqlite3 have no frame pointers:
//! their open's stacks once showed a frame twice in a row and frames that
//! were stale return addresses (`PyObject_CallFinalizer`,
//! `sqlite3_randomness`).
//!
//! And a site's resource is its own fd's, never that of a later fd under
//! the same number (tests/native/fd_swap.c).
//!
//! Needs root, cc, strip, nm, readelf, python3 and a built fdtrace.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use fdtrace_tests::{require_root, run_fdtrace};
use serde_json::Value;

const NATIVE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/native");
const LEAKERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/leakers");

/// Runs `cmd`, fails with its stderr unless it succeeds; its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `fdtrace ARGS` (30 s at most); its stdout, once it succeeded.
fn trace(args: &[&str]) -> String {
    let done = run_fdtrace(args, Duration::from_secs(30));
    assert!(
        done.status.success(),
        "fdtrace {args:?} failed ({}): {}",
        done.status,
        done.stderr
    );
    done.stdout
}

/// A fresh directory for one test's files, removed when dropped (also when
/// the test fails). Its name has no digits (the pid in letters): fdtrace
/// shows numbers in paths as `N`, and the test finds its sites by their path.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let tag: String = std::process::id()
            .to_string()
            .bytes()
            .map(|b| char::from(b - b'0' + b'a'))
            .collect();
        let d = std::env::temp_dir().join(format!("fdtrace-{name}-{tag}"));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `[start, end)` of symbol `name` in `nm -S` output.
fn symbol_range(nm: &str, name: &str) -> (u64, u64) {
    let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
    nm.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[3] == name).then(|| (hex(f[0]), hex(f[0]) + hex(f[1])))
        })
        .unwrap_or_else(|| panic!("no {name} in nm -S output:\n{nm}"))
}

/// p_vaddr - p_offset of the executable PT_LOAD in `readelf -lW` output:
/// what turns a file offset (the `module+0xOFFSET` of a frame) into an
/// address of the file.
fn text_bias(readelf: &str) -> u64 {
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
    readelf
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&"LOAD") && f.len() >= 8 && f[6..f.len() - 1].contains(&"E"))
                .then(|| hex(f[2]) - hex(f[1]))
        })
        .unwrap_or_else(|| panic!("no executable LOAD in readelf -lW output:\n{readelf}"))
}

/// The 1-based number of the only line of `file` that contains `text`.
fn line_of(file: &Path, text: &str) -> usize {
    let src = fs::read_to_string(file).unwrap();
    let lines: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(text))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{text:?} in {}: lines {lines:?}",
        file.display()
    );
    lines[0]
}

/// The `stack` of every `site` object of `resource` in NDJSON `out`; fails
/// when there is none.
fn stacks_of(out: &str, resource: &str) -> Vec<Vec<String>> {
    let stacks: Vec<Vec<String>> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "site" && v["resource"] == resource)
        .map(|v| {
            v["stack"]
                .as_array()
                .unwrap_or_else(|| panic!("site without a stack array: {v}"))
                .iter()
                .map(|f| f.as_str().expect("stack frames are strings").to_string())
                .collect()
        })
        .collect();
    assert!(
        !stacks.is_empty(),
        "no site object of {resource} in fdtrace's output:\n{out}"
    );
    stacks
}

/// Fails if a frame is twice in a row.
fn assert_no_repeat(stack: &[String], what: &str) {
    if let Some(w) = stack.windows(2).find(|w| w[0] == w[1]) {
        panic!("{what}: frame {:?} twice in a row in {stack:#?}", w[0]);
    }
}

#[test]
fn static_function_of_a_stripped_library_is_its_module_offset() {
    require_root();
    let scratch = Scratch::new("native-stacks");
    let d = &scratch.0;
    let lib_src = Path::new(NATIVE).join("stk_lib.c");
    let main_src = Path::new(NATIVE).join("stk_main.c");
    // Without frame pointers, no sibling calls (each function's frame is
    // on the stack when open runs), in source order (the static function
    // right after stk_neighbour).
    let full = d.join("full");
    fs::create_dir_all(&full).unwrap();
    run(Command::new("cc")
        .args([
            "-O1",
            "-fPIC",
            "-shared",
            "-fomit-frame-pointer",
            "-fno-optimize-sibling-calls",
            "-fno-inline",
            "-fno-toplevel-reorder",
            "-fno-reorder-functions",
            "-o",
        ])
        .arg(full.join("libstk.so"))
        .arg(&lib_src));
    let nm = run(Command::new("nm").arg("-S").arg(full.join("libstk.so")));
    let hidden = symbol_range(&nm, "stk_hidden_open");
    let neighbour = symbol_range(&nm, "stk_neighbour");
    assert!(
        neighbour.1 <= hidden.0,
        "stk_neighbour should be laid out before stk_hidden_open:\n{nm}"
    );
    let lib = d.join("libstk.so");
    run(Command::new("strip")
        .arg("-o")
        .arg(&lib)
        .arg(full.join("libstk.so")));
    let left = run(Command::new("nm").arg("-a").arg(&lib).env("LC_ALL", "C"));
    assert!(
        !left.contains("stk_hidden_open"),
        "the stripped libstk.so still names stk_hidden_open:\n{left}"
    );
    let bias = text_bias(&run(Command::new("readelf").arg("-lW").arg(&lib)));
    let exe = d.join("stk_main");
    run(Command::new("cc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&exe)
        .arg(&main_src)
        .arg("-L")
        .arg(d)
        .arg("-lstk")
        .arg(format!("-Wl,-rpath,{}", d.display())));
    let target = d.join("target.txt");
    fs::write(&target, "x").unwrap();

    let (exe_s, target_s) = (exe.to_str().unwrap(), target.to_str().unwrap());
    let out = trace(&[
        "--json", "-i", "100ms", "-d", "2s", "run", "--", exe_s, target_s, "3",
    ]);
    let call_line = line_of(&main_src, "stk_open_leak(path);");
    let main_line = line_of(&main_src, "leak_through_lib(argv[1]);");
    for stack in stacks_of(&out, target_s) {
        let ctx = format!("stack of the site of {target_s}: {stack:#?}");
        assert_no_repeat(&stack, &ctx);
        assert!(stack.len() >= 4, "{ctx}: expected at least 4 frames");
        // libc's open (named from libc's symbols or its debug info).
        assert!(
            stack[0].contains("open") || stack[0].starts_with("libc.so"),
            "{ctx}: frame 0 should be libc's open"
        );
        // The static function: a return address inside it, as an offset of
        // the stripped file.
        let off = stack[1]
            .strip_prefix("libstk.so+0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .unwrap_or_else(|| panic!("{ctx}: frame 1 should be libstk.so+0xOFFSET"));
        let addr = off + bias;
        assert!(
            hidden.0 < addr && addr <= hidden.1,
            "{ctx}: frame 1 at {addr:#x} is not in stk_hidden_open [{:#x}, {:#x})",
            hidden.0,
            hidden.1
        );
        // The exported entry, from the dynamic symbol table.
        assert_eq!(stack[2], "stk_open_leak", "{ctx}: frame 2");
        // The main program's caller, at the line of its call.
        assert_eq!(
            stack[3],
            format!("leak_through_lib (stk_main.c:{call_line})"),
            "{ctx}: frame 3"
        );
        // Then main (where the window still reaches), and nothing else: main
        // is called through a register, which no frame can be proven from.
        if let Some(f) = stack.get(4) {
            assert_eq!(
                f,
                &format!("main (stk_main.c:{main_line})"),
                "{ctx}: frame 4"
            );
        }
        for f in &stack[5.min(stack.len())..] {
            assert!(
                f.starts_with("__libc_start") || f.starts_with("_start"),
                "{ctx}: frame {f:?} is not main's caller"
            );
        }
        assert!(
            !stack.iter().any(|f| f.contains("stk_neighbour")),
            "{ctx}: a frame names stk_neighbour"
        );
    }
}

/// Runs tests/native/fd_swap.c (open_b through libc's `wrapper`) for 3 s
/// under `fdtrace --json -i 10ms run`, with a stack for every fd; the stacks
/// of the sites of A and of B in the reports from `after_s` seconds after
/// the start on, and what open_a and open_b are called in them.
fn fd_swap(
    wrapper: &str,
    after_s: f64,
) -> [(String, Vec<Vec<String>>, &'static str, &'static str); 2] {
    require_root();
    let scratch = Scratch::new(&format!("fd-swap-{wrapper}"));
    let d = &scratch.0;
    let src = Path::new(NATIVE).join("fd_swap.c");
    let exe = d.join("fd_swap");
    run(Command::new("cc")
        .args(["-O0", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&exe)
        .arg(&src));
    let (a, b) = (d.join("a.txt"), d.join("b.txt"));
    fs::write(&a, "a").unwrap();
    fs::write(&b, "b").unwrap();
    let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
    let out = trace(&[
        "--json",
        "-i",
        "10ms",
        // Every fd gets its stack (the default budget would leave most
        // of these 5000 fds/s without one).
        "--stack-rate",
        "1000000",
        "run",
        "--",
        exe.to_str().unwrap(),
        a,
        b,
        "3",
        wrapper,
    ]);
    let records: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let start = records
        .iter()
        .find(|r| r["type"] == "start")
        .and_then(|r| r["ts"].as_f64())
        .expect("a start object");
    let late: String = records
        .iter()
        .filter(|r| r["ts"].as_f64().is_some_and(|t| t >= start + after_s))
        .map(|r| format!("{r}\n"))
        .collect();
    [(a, "open_a", "open_b"), (b, "open_b", "open_a")]
        .map(|(r, own, other)| (r.to_string(), stacks_of(&late, r), own, other))
}

/// Fails unless every stack of the sites of each resource goes through its
/// own function and not the other's.
fn check_swap_stacks(sites: &[(String, Vec<Vec<String>>, &str, &str)]) {
    for (resource, stacks, own, other) in sites {
        let wrong: Vec<&Vec<String>> = stacks
            .iter()
            .filter(|s| {
                !s.iter().any(|f| f.starts_with(own)) || s.iter().any(|f| f.starts_with(other))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{} of {} sites of {resource} have a stack not through {own}: {wrong:#?}",
            wrong.len(),
            stacks.len()
        );
    }
}

/// A site's resource is that of the fd its stack made. fd_swap takes one fd
/// number in turns for A (from `open_a`) and B (from `open_b`, through
/// openat: another kernel stack), for a few hundred microseconds each; with
/// a report every 10 ms, some report reads the kernel's table while one
/// holds the number and the fd's link in /proc after the other took it.
/// That label once put B under `open_a`'s site (and A under `open_b`'s),
/// some 10 times in 3 s.
#[test]
fn a_site_never_gets_the_resource_of_a_later_fd_with_its_number() {
    check_swap_stacks(&fd_swap("openat", 0.0));
}

/// Two callers of libc's open, with paths alike in their bytes 8 to 15 (the
/// scratch directory's name): the kernel's walk gives both one stack. Each
/// once showed open_a's frames, the first caller's, for as long as the
/// process ran. Once the first report has unwound the stack and told the
/// kernel where open keeps its return address, each fd's site carries its
/// caller; only fds made before that (here, closed within the first report
/// or so) can show the other caller's frames.
#[test]
fn two_callers_of_one_libc_wrapper_keep_their_own_frames() {
    check_swap_stacks(&fd_swap("open", 0.5));
}

/// The interpreter that `python3` runs (not a pyenv shim: a shell script
/// would be the traced process), by its real path (the name its frames get).
fn python() -> PathBuf {
    let out = run(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]));
    fs::canonicalize(out.trim())
        .unwrap_or_else(|e| panic!("python3's sys.executable {:?}: {e}", out.trim()))
}

/// Runs a leaker of tests/leakers at 20 fds/s for 2 s under `fdtrace --json
/// run`; the stacks of the sites of DIR/`file`.
fn python_stacks(script: &str, file: &str) -> Vec<Vec<String>> {
    require_root();
    let scratch = Scratch::new(script.trim_end_matches(".py"));
    let d = &scratch.0;
    let py = python();
    let script_path = format!("{LEAKERS}/{script}");
    let out = trace(&[
        "--json",
        "-i",
        "100ms",
        "-d",
        "2s",
        // Every fd gets its stack: the interpreter's start opens a burst
        // of files that can use up the default budget's 100 ms slot just
        // before the leaker's first open.
        "--stack-rate",
        "1000000",
        "run",
        "--",
        py.to_str().unwrap(),
        &script_path,
        "20",
        d.to_str().unwrap(),
    ]);
    stacks_of(&out, d.join(file).to_str().unwrap())
}

/// Frame 0 is libc's open; no frame twice in a row, none of the names that
/// stale return addresses took, and none of `wrong`.
fn check_python_stacks(stacks: &[Vec<String>], what: &str, wrong: &[&str]) {
    for stack in stacks {
        let ctx = format!("{what}: {stack:#?}");
        assert!(
            stack.first().is_some_and(|f| f.contains("open")),
            "{ctx}: frame 0 should be libc's open"
        );
        assert_no_repeat(stack, what);
        if let Some(f) = stack
            .iter()
            .find(|f| wrong.iter().any(|w| f.starts_with(w)))
        {
            panic!("{ctx}: frame {f:?} is not on the stack of an open");
        }
    }
}

#[test]
fn python_logging_file_handler_stack_has_no_stale_frames() {
    let stacks = python_stacks("logging_leak.py", "app.log");
    let what = "stack of logging.FileHandler's open";
    check_python_stacks(&stacks, what, &["PyObject_CallFinalizer"]);
    // io.FileIO's init calls open itself, directly: its frame is proven,
    // named where the interpreter has symbols, else an offset of the
    // interpreter (or of libpython).
    let exe = python();
    let exe = exe.file_name().unwrap().to_str().unwrap();
    for stack in &stacks {
        let caller = stack.get(1).map(String::as_str).unwrap_or("");
        assert!(
            caller.starts_with("_io_FileIO___init__")
                || caller.starts_with(&format!("{exe}+0x"))
                || caller.starts_with("libpython"),
            "{what}: frame 1 should be io.FileIO's init (in {exe} or libpython): {stack:#?}"
        );
    }
}

#[test]
fn python_sqlite_open_stack_has_no_stale_frames() {
    let stacks = python_stacks("sqlite_leak.py", "db.sqlite");
    check_python_stacks(
        &stacks,
        "stack of sqlite3.connect's open",
        &["sqlite3_randomness"],
    );
}
