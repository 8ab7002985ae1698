//! TCC and XA: once submitted, confirm (commit) every branch; once aborting, cancel
//! (roll back) every branch. TCC walks branches last to first and runs rows still
//! `prepared`; XA walks first to last and runs rows not yet `succeed`.

use dtm_proto::{op, status, trans_type};

use super::{Ctx, PassEnd, Sched, Stop};

pub(crate) async fn process(ctx: &mut Ctx<'_>) -> Result<PassEnd, Stop> {
    if ctx.g.status == status::PREPARED {
        if !ctx.timed_out() {
            if let Some(at) = ctx.timeout_at() {
                ctx.touch(Sched::At(at)).await?;
            }
            return Ok(PassEnd::Done);
        }
        let r = ctx.timeout_reason();
        ctx.change_status(status::ABORTING, Some(r)).await?;
    }
    let xa = ctx.g.trans_type == trans_type::XA;
    let op = match (ctx.g.status.as_str(), xa) {
        (status::SUBMITTED, false) => op::CONFIRM,
        (status::SUBMITTED, true) => op::COMMIT,
        (status::ABORTING, false) => op::CANCEL,
        (status::ABORTING, true) => op::ROLLBACK,
        _ => return Ok(PassEnd::Done),
    };
    let order: Vec<usize> = if xa {
        (0..ctx.branches.len()).collect()
    } else {
        (0..ctx.branches.len()).rev().collect()
    };
    for i in order {
        let b = &ctx.branches[i];
        let due = b.op == op
            && if xa {
                b.status != status::SUCCEED
            } else {
                b.status == status::PREPARED
            };
        if !due {
            continue;
        }
        let url = b.url.clone();
        let call = ctx.call_for(b);
        ctx.keep_lease().await?;
        let out = ctx.exec(call).await;
        if out.is_success() {
            ctx.set_branch(i, status::SUCCEED);
        } else {
            return ctx.retry_later(&out, &url).await;
        }
    }
    let fin = if ctx.g.status == status::SUBMITTED {
        status::SUCCEED
    } else {
        status::FAILED
    };
    ctx.change_status(fin, None).await?;
    Ok(PassEnd::Done)
}
