//! Replies of the fdops helper (src/bin/fdops.rs).

use std::collections::HashMap;

/// One reply line of fdops: `@fdops STATUS key=value ...`.
#[derive(Clone, Debug)]
pub struct Reply {
    pub line: String,
    pub status: String,
    pub fields: HashMap<String, String>,
    /// When the test received it (Unix seconds).
    pub at: f64,
}

impl Reply {
    pub(crate) fn parse(line: &str, at: f64) -> Reply {
        let rest = line.strip_prefix("@fdops ").unwrap_or(line);
        let mut words = rest.splitn(2, ' ');
        let status = words.next().unwrap_or("").to_string();
        let body = words.next().unwrap_or("");
        let mut fields = HashMap::new();
        // msg= is last and may hold spaces.
        let (body, msg) = match body.find(" msg=") {
            Some(i) => (&body[..i], Some(&body[i + 5..])),
            None => match body.strip_prefix("msg=") {
                Some(m) => ("", Some(m)),
                None => (body, None),
            },
        };
        for w in body.split_whitespace() {
            if let Some((k, v)) = w.split_once('=') {
                fields.insert(k.to_string(), v.to_string());
            }
        }
        if let Some(m) = msg {
            fields.insert("msg".to_string(), m.to_string());
        }
        Reply {
            line: line.to_string(),
            status,
            fields,
            at,
        }
    }

    pub fn get(&self, key: &str) -> &str {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("fdops reply has no {key}=: {}", self.line))
    }

    pub fn num(&self, key: &str) -> i64 {
        let v = self.get(key);
        v.parse()
            .unwrap_or_else(|_| panic!("fdops reply {key}={v} is not a number: {}", self.line))
    }

    pub fn fds(&self, key: &str) -> Vec<i32> {
        let v = self.get(key);
        if v == "-" {
            return Vec::new();
        }
        v.split(',')
            .map(|x| {
                x.parse()
                    .unwrap_or_else(|_| panic!("bad fd list {key}={v}: {}", self.line))
            })
            .collect()
    }

    pub fn fd(&self) -> i32 {
        let v = self.fds("fds");
        assert_eq!(v.len(), 1, "expected one fd: {}", self.line);
        v[0]
    }

    pub fn pid(&self) -> i32 {
        self.num("pid") as i32
    }

    pub fn tid(&self) -> i32 {
        self.num("tid") as i32
    }

    pub fn opened(&self) -> u64 {
        self.num("opened") as u64
    }

    pub fn closed(&self) -> u64 {
        self.num("closed") as u64
    }
}
