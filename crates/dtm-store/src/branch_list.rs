//! A list of branches encoded as one value: the branches a transaction is saved with (a
//! saga's or msg's steps), kept in one column of its `trans_global` row, so that saving a
//! saga is one row insert and finishing it one row update, whatever its number of steps.
//! Branches added later (tcc, xa, workflow) are rows of their own instead, so that adding
//! one does not rewrite the list. The embedded store keeps the list in `branches` and
//! changes it in place ([`update`]); Postgres keeps it in `branches` too, and appends
//! each change to a log in `branch_states` ([`state_log`], [`apply_state_log`]), which
//! SQL can do without reading the list.
//!
//! Layout: one version byte ([`VERSION`]), then per branch, in insertion order: `url`,
//! `bin_data`, `branch_id`, `op`, `status` (each a u32 length and its bytes), then
//! `create_time`, `update_time`, `finish_time`, `rollback_time` (each a presence byte, then
//! i64 milliseconds when present). Integers are little-endian. An empty or NULL column
//! holds no branches. Neither the gid nor the id is stored: the gid is the row's, and a
//! branch's id is its position in the list.

use chrono::{DateTime, Utc};
use dtm_core::store::BranchUpdate;
use dtm_proto::Branch;

/// The first byte of every encoded list.
pub(crate) const VERSION: u8 = 1;

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // a field longer than 4 GiB cannot reach here: request bodies are far smaller
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn put_time(out: &mut Vec<u8>, t: &Option<DateTime<Utc>>) {
    match t {
        Some(t) => {
            out.push(1);
            out.extend_from_slice(&t.timestamp_millis().to_le_bytes());
        }
        None => out.push(0),
    }
}

/// Encode `branches` (their `gid` and `id` are not stored).
pub(crate) fn encode(branches: &[Branch]) -> Vec<u8> {
    let size: usize = branches
        .iter()
        .map(|b| {
            5 * 4
                + 4 * 9
                + b.url.len()
                + b.bin_data.len()
                + b.branch_id.len()
                + b.op.len()
                + b.status.len()
        })
        .sum();
    let mut out = Vec::with_capacity(1 + size);
    out.push(VERSION);
    for b in branches {
        put_bytes(&mut out, b.url.as_bytes());
        put_bytes(&mut out, &b.bin_data);
        put_bytes(&mut out, b.branch_id.as_bytes());
        put_bytes(&mut out, b.op.as_bytes());
        put_bytes(&mut out, b.status.as_bytes());
        for t in [
            &b.create_time,
            &b.update_time,
            &b.finish_time,
            &b.rollback_time,
        ] {
            put_time(&mut out, t);
        }
    }
    out
}

struct Reader<'a> {
    rest: &'a [u8],
    /// Offset of `rest` in the whole blob, for error messages.
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err(format!(
                "{what} at byte {} needs {n} bytes, {} are left",
                self.at,
                self.rest.len()
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        self.at += n;
        Ok(head)
    }

    fn i64(&mut self, what: &str) -> Result<i64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }

    fn bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let b = self.take(4, what)?;
        let mut a = [0u8; 4];
        a.copy_from_slice(b);
        self.take(u32::from_le_bytes(a) as usize, what)
    }

    fn text(&mut self, what: &str) -> Result<String, String> {
        let at = self.at;
        let b = self.bytes(what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} at byte {at} is not UTF-8"))
    }

    /// A time as its encoded bytes (a presence byte, and 8 more when present).
    fn time_bytes(&mut self, what: &str) -> Result<&'a [u8], String> {
        let (rest, at) = (self.rest, self.at);
        match self.take(1, what)?[0] {
            0 => Ok(&rest[..1]),
            1 => {
                self.take(8, what)?;
                Ok(&rest[..9])
            }
            f => Err(format!("{what} at byte {at} has presence byte {f}")),
        }
    }

    fn time(&mut self, what: &str) -> Result<Option<DateTime<Utc>>, String> {
        match self.take(1, what)?[0] {
            0 => Ok(None),
            1 => {
                let ms = self.i64(what)?;
                DateTime::from_timestamp_millis(ms)
                    .map(Some)
                    .ok_or_else(|| format!("{what} {ms} ms is out of range"))
            }
            f => Err(format!(
                "{what} at byte {} has presence byte {f}",
                self.at - 1
            )),
        }
    }
}

/// Apply `ups` to the encoded list `data` without decoding it: each branch is copied as
/// it is, except that a branch with the (branch_id, op) of an update gets that update's
/// status, and its time as `update_time` and `finish_time` (the last such update, as
/// when they are applied one after the other). Returns the new list, or `None` when no
/// update matched, and the updates that matched no branch.
pub(crate) fn update<'u>(
    data: &[u8],
    ups: &'u [BranchUpdate],
) -> Result<(Option<Vec<u8>>, Vec<&'u BranchUpdate>), String> {
    let mut matched = vec![false; ups.len()];
    let mut out = Vec::with_capacity(data.len() + 16 * ups.len());
    if let Some(&v) = data.first()
        && v != VERSION
    {
        return Err(version_error(v));
    }
    out.push(VERSION);
    let mut r = Reader {
        rest: data.get(1..).unwrap_or_default(),
        at: 1,
    };
    while !r.rest.is_empty() {
        let start = r.rest;
        r.bytes("url")?;
        r.bytes("bin_data")?;
        let branch_id = r.bytes("branch_id")?;
        let op = r.bytes("op")?;
        let head_len = start.len() - r.rest.len();
        r.bytes("status")?;
        let create = r.time_bytes("create_time")?;
        r.time_bytes("update_time")?;
        r.time_bytes("finish_time")?;
        let rollback = r.time_bytes("rollback_time")?;
        let mut last = None;
        for (i, u) in ups.iter().enumerate() {
            if u.branch_id.as_bytes() == branch_id && u.op.as_bytes() == op {
                matched[i] = true;
                last = Some(u);
            }
        }
        match last {
            None => out.extend_from_slice(&start[..start.len() - r.rest.len()]),
            Some(u) => {
                out.extend_from_slice(&start[..head_len]);
                put_bytes(&mut out, u.status.as_bytes());
                out.extend_from_slice(create);
                put_time(&mut out, &Some(u.time));
                put_time(&mut out, &Some(u.time));
                out.extend_from_slice(rollback);
            }
        }
    }
    let rest: Vec<&BranchUpdate> = ups
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
        .map(|(u, _)| u)
        .collect();
    let changed = matched.iter().any(|m| *m);
    Ok((changed.then_some(out), rest))
}

/// The state log entries of `ups`, one JSON array per line: `[op, branch_id, status,
/// unix ms]`. Appended to what is stored, in order; the last entry of a branch wins.
pub(crate) fn state_log(ups: &[BranchUpdate]) -> String {
    let mut out = String::with_capacity(48 * ups.len());
    for u in ups {
        let line = serde_json::json!([u.op, u.branch_id, u.status, u.time.timestamp_millis()]);
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// Apply a state log to the branches of the list it belongs to: each entry sets the
/// status of the branch with its (branch_id, op), and its time as `update_time` and
/// `finish_time`. Entries for a branch that is not in the list change nothing (like an
/// SQL UPDATE that matches no row).
pub(crate) fn apply_state_log(branches: &mut [Branch], log: &str) -> Result<(), String> {
    for (n, line) in log.lines().enumerate().filter(|(_, l)| !l.is_empty()) {
        let (op, branch_id, status, ms): (String, String, String, i64) = serde_json::from_str(line)
            .map_err(|e| format!("branch state log line {}: {e}", n + 1))?;
        let t = DateTime::from_timestamp_millis(ms)
            .ok_or_else(|| format!("branch state log line {}: {ms} ms is out of range", n + 1))?;
        for b in branches
            .iter_mut()
            .filter(|b| b.branch_id == branch_id && b.op == op)
        {
            b.status.clone_from(&status);
            b.update_time = Some(t);
            b.finish_time = Some(t);
        }
    }
    Ok(())
}

fn version_error(v: u8) -> String {
    format!(
        "branch list version {v} is not known to this server (it knows {VERSION}); was the store written by a newer dtm-rs?"
    )
}

/// Decode a `branches` column (NULL and empty hold none). Ids are positions from 1; the
/// gid is left empty.
pub(crate) fn decode(data: Option<&[u8]>) -> Result<Vec<Branch>, String> {
    let data = match data {
        None | Some([]) => return Ok(Vec::new()),
        Some(d) => d,
    };
    if data[0] != VERSION {
        return Err(version_error(data[0]));
    }
    let mut r = Reader {
        rest: &data[1..],
        at: 1,
    };
    let mut out = Vec::new();
    while !r.rest.is_empty() {
        out.push(Branch {
            id: out.len() as i64 + 1,
            gid: String::new(),
            url: r.text("url")?,
            bin_data: r.bytes("bin_data")?.to_vec(),
            branch_id: r.text("branch_id")?,
            op: r.text("op")?,
            status: r.text("status")?,
            create_time: r.time("create_time")?,
            update_time: r.time("update_time")?,
            finish_time: r.time("finish_time")?,
            rollback_time: r.time("rollback_time")?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp_millis(ms)
    }

    fn sample() -> Vec<Branch> {
        vec![
            Branch {
                id: 1,
                gid: String::new(),
                url: "http://svc/TransOut?x=ü".into(),
                bin_data: vec![0, 255, b'{', b'}'],
                branch_id: "01".into(),
                op: "action".into(),
                status: "succeed".into(),
                create_time: at(1_700_000_000_123),
                update_time: at(1_700_000_000_456),
                finish_time: at(1_700_000_000_456),
                rollback_time: None,
            },
            Branch {
                id: 2,
                op: "compensate".into(),
                status: "prepared".into(),
                create_time: at(-5),
                ..Branch::default()
            },
        ]
    }

    #[test]
    fn branches_come_back_as_they_were_written() {
        let bs = sample();
        let blob = encode(&bs);
        assert_eq!(blob[0], VERSION);
        assert_eq!(decode(Some(&blob)), Ok(bs.clone()));
        // ids are positions, whatever the branches held; the gid is not kept
        let other: Vec<Branch> = bs
            .iter()
            .map(|b| Branch {
                id: b.id + 40,
                gid: "g".into(),
                ..b.clone()
            })
            .collect();
        assert_eq!(decode(Some(&encode(&other))), Ok(bs));
        assert_eq!(decode(None), Ok(vec![]));
        assert_eq!(decode(Some(&[])), Ok(vec![]));
        assert_eq!(decode(Some(&encode(&[]))), Ok(vec![]));
    }

    fn up(id: &str, op: &str, status: &str, ms: i64) -> BranchUpdate {
        BranchUpdate {
            branch_id: id.into(),
            op: op.into(),
            status: status.into(),
            time: at(ms).unwrap_or_default(),
        }
    }

    /// `update` gives what decoding, changing the branches and encoding again gives.
    #[test]
    fn updates_apply_in_place_and_the_unmatched_are_returned() {
        let bs = sample();
        let blob = encode(&bs);
        let ups = vec![
            up("", "compensate", "failed", 7_000),
            up("09", "action", "succeed", 7_001),
            up("01", "action", "failed", 7_002),
            up("", "compensate", "succeed", 7_003),
        ];
        let (got, rest) = update(&blob, &ups).unwrap_or_else(|e| panic!("{e}"));
        let mut want = bs.clone();
        want[0].status = "failed".into();
        want[0].update_time = at(7_002);
        want[0].finish_time = at(7_002);
        want[1].status = "succeed".into();
        want[1].update_time = at(7_003);
        want[1].finish_time = at(7_003);
        let got = got.unwrap_or_else(|| panic!("no branch changed"));
        assert_eq!(decode(Some(&got)), Ok(want));
        assert_eq!(rest, vec![&ups[1]]);
        let (none, rest) = update(&blob, &ups[1..2]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((none, rest.len()), (None, 1));
        let (none, rest) = update(&[], &ups).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((none, rest.len()), (None, 4));
        let cut = &blob[..blob.len() - 2];
        let e = update(cut, &ups).err().unwrap_or_default();
        assert!(e.contains("at byte"), "{e}");
    }

    #[test]
    fn a_damaged_list_is_an_error_that_says_where() {
        let blob = encode(&sample());
        for cut in 2..blob.len() {
            let got = decode(Some(&blob[..cut]));
            // a cut that falls between two branches is a shorter, valid list
            if let Ok(bs) = &got {
                assert_eq!(bs.len(), 1, "cut at {cut}");
                continue;
            }
            let e = got.err().unwrap_or_default();
            assert!(e.contains("at byte") || e.contains("UTF-8"), "{cut}: {e}");
        }
        let mut newer = blob.clone();
        newer[0] = 7;
        let e = decode(Some(&newer)).err().unwrap_or_default();
        assert!(e.contains("version 7"), "{e}");
        let mut bad_flag = encode(&sample()[1..]);
        // the list ends with update_time, finish_time and rollback_time, all absent
        let flag = bad_flag.len() - 3;
        bad_flag[flag] = 2;
        let e = decode(Some(&bad_flag)).err().unwrap_or_default();
        assert!(e.contains("presence byte 2"), "{e}");
    }

    /// Applying a state log gives what `update` gives for the same updates; entries
    /// of branches not in the list change nothing.
    #[test]
    fn a_state_log_applies_like_update() {
        let bs = sample();
        let ups = vec![
            up("", "compensate", "failed", 7_000),
            up("09", "action", "succeed", 7_001),
            up("01", "action", "failed", 7_002),
            up("", "compensate", "succeed", 7_003),
        ];
        // written in two appends, as two writes of a pass would
        let log = state_log(&ups[..2]) + &state_log(&ups[2..]);
        assert_eq!(log.lines().count(), 4);
        let mut got = bs.clone();
        apply_state_log(&mut got, &log).unwrap_or_else(|e| panic!("{e}"));
        let (blob, _) = update(&encode(&bs), &ups).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Ok(got), decode(blob.as_deref()));
        let mut same = bs.clone();
        apply_state_log(&mut same, "").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(same, bs);
        let e = apply_state_log(&mut same, "[\"action\",\"01\"]\n")
            .err()
            .unwrap_or_default();
        assert!(e.contains("line 1"), "{e}");
    }
}
