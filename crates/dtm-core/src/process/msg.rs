//! Two-phase message: a prepared message that timed out is back-checked through
//! `query_prepared`; a submitted one runs its action branches until all succeed.

use dtm_proto::{BranchOutcome, op, status};
use futures::future::join_all;

use super::{Ctx, PassEnd, Sched, Stop};
use crate::service::{now, secs};

/// `{"delay": N}` of custom_data, key matched case-insensitively.
fn delay_of(custom: &str) -> i64 {
    let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(custom) else {
        return 0;
    };
    m.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("delay"))
        .and_then(|(_, v)| v.as_i64())
        .unwrap_or(0)
}

pub(crate) async fn process(ctx: &mut Ctx<'_>) -> Result<PassEnd, Stop> {
    if ctx.g.status == status::PREPARED {
        if !ctx.timed_out() {
            let at = ctx.timeout_at().unwrap_or_else(|| now() + secs(ctx.base()));
            ctx.touch(Sched::At(at)).await?;
            return Ok(PassEnd::Done);
        }
        let call = ctx.call(&ctx.g.query_prepared, Vec::new(), "00", op::MSG);
        let qp = ctx.g.query_prepared.clone();
        match ctx.exec(call).await {
            BranchOutcome::Success => ctx.change_status(status::SUBMITTED, None).await?,
            BranchOutcome::Failure(m) => {
                ctx.change_status(
                    status::FAILED,
                    Some(format!("query_prepared {qp} answered FAILURE: {m}")),
                )
                .await?;
                return Ok(PassEnd::Done);
            }
            BranchOutcome::Ongoing(_) => {
                ctx.touch(Sched::Reset).await?;
                return Ok(PassEnd::Done);
            }
            out @ BranchOutcome::Error(_) => return ctx.retry_later(&out, &qp).await,
        }
    }
    if ctx.g.status != status::SUBMITTED {
        return Ok(PassEnd::Done);
    }
    let delay = delay_of(&ctx.g.custom_data);
    if delay > 0
        && let Some(created) = ctx.g.create_time
        && now() < created + secs(delay)
    {
        ctx.touch(Sched::At(created + secs(delay))).await?;
        return Ok(PassEnd::Done);
    }
    let todo: Vec<usize> = (0..ctx.branches.len())
        .filter(|&i| ctx.branches[i].op == op::ACTION && ctx.branches[i].status == status::PREPARED)
        .collect();
    let mut problem: Option<(BranchOutcome, String)> = None;
    if ctx.opts.concurrent {
        let co = ctx.co;
        let calls: Vec<_> = todo
            .iter()
            .map(|&i| ctx.call_for(&ctx.branches[i]))
            .collect();
        let outs = join_all(calls.into_iter().map(|c| super::exec(co, c))).await;
        for (&i, out) in todo.iter().zip(outs) {
            if out.is_success() {
                ctx.set_branch(i, status::SUCCEED);
            } else if problem
                .as_ref()
                .is_none_or(|(p, _)| matches!(p, BranchOutcome::Ongoing(_)))
            {
                problem = Some((out, ctx.branches[i].url.clone()));
            }
        }
    } else {
        for &i in &todo {
            ctx.keep_lease().await?;
            let call = ctx.call_for(&ctx.branches[i]);
            let out = ctx.exec(call).await;
            if out.is_success() {
                ctx.set_branch(i, status::SUCCEED);
            } else {
                problem = Some((out, ctx.branches[i].url.clone()));
                break;
            }
        }
    }
    match problem {
        None => {
            ctx.change_status(status::SUCCEED, None).await?;
            Ok(PassEnd::Done)
        }
        Some((out @ BranchOutcome::Ongoing(_), url)) => {
            ctx.retry_later(&out, &url).await?;
            // dtm reports a msg left ongoing through its status
            Ok(PassEnd::Done)
        }
        Some((out, url)) => ctx.retry_later(&out, &url).await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn delay_is_case_insensitive() {
        assert_eq!(super::delay_of(r#"{"delay":10}"#), 10);
        assert_eq!(super::delay_of(r#"{"Delay":3}"#), 3);
        assert_eq!(super::delay_of(""), 0);
        assert_eq!(super::delay_of("nonsense"), 0);
    }
}
