//! SAGA: forward actions in order (or concurrently, with `orders` dependencies); on a
//! FAILURE, `aborting` is written, then compensations run in reverse, including the
//! compensation of the failed action and of actions that were in flight.

use std::collections::BTreeMap;

use dtm_proto::{BranchOutcome, op, status};
use futures::stream::{FuturesUnordered, StreamExt};

use super::{Ctx, PassEnd, Sched, Stop};

/// `custom_data` of a saga.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SagaCustom {
    pub concurrent: bool,
    /// step -> steps whose actions must have succeeded before it starts
    pub orders: BTreeMap<usize, Vec<usize>>,
}

/// Parse and check `{"orders":{"1":[0]},"concurrent":true}` for `n` steps.
pub(crate) fn parse_custom(s: &str, n: usize) -> Result<SagaCustom, String> {
    if s.trim().is_empty() {
        return Ok(SagaCustom::default());
    }
    let v: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("custom_data is not valid JSON: {e}"))?;
    let mut c = SagaCustom {
        concurrent: v
            .get("concurrent")
            .and_then(|x| x.as_bool())
            .unwrap_or(false),
        ..Default::default()
    };
    if let Some(orders) = v.get("orders").and_then(|o| o.as_object()) {
        for (k, deps) in orders {
            let step: usize = k
                .parse()
                .map_err(|_| format!("custom_data.orders key '{k}' is not a step index"))?;
            let deps = deps.as_array().ok_or_else(|| {
                format!("custom_data.orders[{k}] must be an array of step indexes")
            })?;
            let mut list = Vec::new();
            for d in deps {
                let d = d
                    .as_u64()
                    .ok_or_else(|| format!("custom_data.orders[{k}] holds a non-index value {d}"))?
                    as usize;
                if d >= n || step >= n || d == step {
                    return Err(format!(
                        "custom_data.orders[{k}] refers to step {d}; steps are 0..{} and a step cannot wait for itself",
                        n.saturating_sub(1)
                    ));
                }
                list.push(d);
            }
            c.orders.insert(step, list);
        }
    }
    // reject cycles: they would never run
    let mut state = vec![0u8; n];
    fn visit(i: usize, c: &SagaCustom, state: &mut [u8]) -> bool {
        if state[i] == 1 {
            return false;
        }
        if state[i] == 2 {
            return true;
        }
        state[i] = 1;
        for &d in c.orders.get(&i).map(Vec::as_slice).unwrap_or(&[]) {
            if !visit(d, c, state) {
                return false;
            }
        }
        state[i] = 2;
        true
    }
    for i in 0..n {
        if !visit(i, &c, &mut state) {
            return Err("custom_data.orders has a cycle: no step of it could ever start".into());
        }
    }
    Ok(c)
}

struct Step {
    action: usize,
    compensate: usize,
}

fn steps_of(ctx: &Ctx<'_>) -> Vec<Step> {
    let mut ids: Vec<&str> = Vec::new();
    let mut steps: Vec<(Option<usize>, Option<usize>)> = Vec::new();
    for (i, b) in ctx.branches.iter().enumerate() {
        let pos = match ids.iter().position(|x| *x == b.branch_id) {
            Some(p) => p,
            None => {
                ids.push(&b.branch_id);
                steps.push((None, None));
                steps.len() - 1
            }
        };
        if b.op == op::ACTION {
            steps[pos].0 = Some(i);
        } else if b.op == op::COMPENSATE {
            steps[pos].1 = Some(i);
        }
    }
    steps
        .into_iter()
        .filter_map(|(a, c)| {
            Some(Step {
                action: a?,
                compensate: c?,
            })
        })
        .collect()
}

pub(crate) async fn process(ctx: &mut Ctx<'_>) -> Result<PassEnd, Stop> {
    if ctx.g.status == status::PREPARED {
        // a prepared saga is never processed; look again later
        ctx.touch(Sched::Reset).await?;
        return Ok(PassEnd::Done);
    }
    let custom = parse_custom(&ctx.g.custom_data, steps_of(ctx).len()).unwrap_or_default();
    let steps = steps_of(ctx);
    let n = steps.len();
    let co = ctx.co;
    let launch =
        |i: usize, call: crate::caller::BranchCall| async move { (i, super::exec(co, call).await) };
    let st = |ctx: &Ctx<'_>, idx: usize| ctx.branches[idx].status.clone();
    let action_ok = |ctx: &Ctx<'_>, i: usize| st(ctx, steps[i].action) == status::SUCCEED;
    // may step i's action start, given the others' statuses?
    let runnable = |ctx: &Ctx<'_>, i: usize| -> bool {
        st(ctx, steps[i].action) == status::PREPARED
            && (custom.concurrent || i == 0 || action_ok(ctx, i - 1))
            && custom
                .orders
                .get(&i)
                .is_none_or(|deps| deps.iter().all(|&d| action_ok(ctx, d)))
    };

    if ctx.g.status == status::SUBMITTED && ctx.timed_out() {
        let r = ctx.timeout_reason();
        ctx.change_status(status::ABORTING, Some(r)).await?;
    }

    let mut started = vec![false; n];
    let mut problem: Option<(BranchOutcome, String)> = None;
    if ctx.g.status == status::SUBMITTED {
        let limit = ctx.opts.retry_limit;
        let mut retries = vec![0i64; n];
        let mut failure: Option<String> = None;
        let mut exceeded = false;
        let mut running = FuturesUnordered::new();
        loop {
            if failure.is_none() && !exceeded {
                for i in 0..n {
                    if !started[i] && runnable(ctx, i) {
                        started[i] = true;
                        let call = ctx.call_for(&ctx.branches[steps[i].action]);
                        running.push(launch(i, call));
                    }
                }
            }
            let Some((i, out)) = running.next().await else {
                break;
            };
            ctx.keep_lease().await?;
            let url = ctx.branches[steps[i].action].url.clone();
            match out {
                BranchOutcome::Success => ctx.set_branch(steps[i].action, status::SUCCEED),
                BranchOutcome::Failure(m) => {
                    ctx.set_branch(steps[i].action, status::FAILED);
                    failure = Some(super::failed_reason(&url, &m));
                }
                other if limit > 0 => {
                    if retries[i] < limit {
                        retries[i] += 1;
                        let call = ctx.call_for(&ctx.branches[steps[i].action]);
                        running.push(launch(i, call));
                    } else {
                        exceeded = true;
                        problem = Some((other, url));
                    }
                }
                other => problem = Some((other, url)),
            }
        }
        if exceeded {
            ctx.change_status(
                status::ABORTING,
                Some(format!(
                    "RetryCount is greater than RetryLimit, RetryLimit: {limit}"
                )),
            )
            .await?;
        } else if let Some(reason) = failure {
            ctx.change_status(status::ABORTING, Some(reason)).await?;
        } else if (0..n).all(|i| action_ok(ctx, i)) {
            ctx.change_status(status::SUCCEED, None).await?;
            return Ok(PassEnd::Done);
        } else if ctx.timed_out() {
            let r = ctx.timeout_reason();
            ctx.change_status(status::ABORTING, Some(r)).await?;
        } else {
            let (out, url) = problem.unwrap_or((
                BranchOutcome::Error("no step could start".into()),
                String::new(),
            ));
            ctx.retry_later(&out, &url).await?;
            // a saga reports through its status, as dtm's does
            return Ok(PassEnd::Done);
        }
    }

    if ctx.g.status != status::ABORTING {
        return Ok(PassEnd::Done);
    }

    // Which steps to compensate: every action that ran (succeeded or failed), that was
    // in flight in this pass, or that could have been started now.
    let to_comp: Vec<bool> = (0..n)
        .map(|i| {
            let a = st(ctx, steps[i].action);
            a == status::SUCCEED || a == status::FAILED || started[i] || runnable(ctx, i)
        })
        .collect();
    let rolled_back =
        |ctx: &Ctx<'_>, i: usize| !to_comp[i] || st(ctx, steps[i].compensate) == status::SUCCEED;
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (k, deps) in &custom.orders {
        for &d in deps {
            dependents[d].push(*k);
        }
    }
    let mut comp_started = vec![false; n];
    let mut running = FuturesUnordered::new();
    loop {
        for i in (0..n).rev() {
            if comp_started[i] || rolled_back(ctx, i) {
                continue;
            }
            let allowed = (custom.concurrent || i == n - 1 || rolled_back(ctx, i + 1))
                && dependents[i].iter().all(|&j| rolled_back(ctx, j));
            if allowed {
                comp_started[i] = true;
                let call = ctx.call_for(&ctx.branches[steps[i].compensate]);
                running.push(launch(i, call));
            }
        }
        let Some((i, out)) = running.next().await else {
            break;
        };
        ctx.keep_lease().await?;
        if out.is_success() {
            ctx.set_branch(steps[i].compensate, status::SUCCEED);
        } else {
            let url = ctx.branches[steps[i].compensate].url.clone();
            problem = Some((out, url));
        }
    }
    if (0..n).all(|i| rolled_back(ctx, i)) {
        ctx.change_status(status::FAILED, None).await?;
        return Ok(PassEnd::Done);
    }
    let (out, url) = problem.unwrap_or((
        BranchOutcome::Error("compensation pending".into()),
        String::new(),
    ));
    ctx.retry_later(&out, &url).await?;
    Ok(PassEnd::Done)
}
