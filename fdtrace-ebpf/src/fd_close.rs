//! close_range: a loop over the process's fd numbers that closes, or with
//! CLOSE_RANGE_CLOEXEC marks close-on-exec (close itself is one
//! table::remove, in sys_exit).
use crate::{
    sys_exit::Call,
    table::{Bulk, bulk},
};

pub fn close_range(c: &Call, first: u32, last: u32, cloexec: bool) {
    let op = if cloexec {
        Bulk::MarkCloexec
    } else {
        Bulk::Close
    };
    bulk(c.p, c.tgid, first, last.saturating_add(1), op, None);
}
