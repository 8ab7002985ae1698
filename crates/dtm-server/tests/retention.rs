//! Retention: with `Store.FinishedDataExpire`, finished transactions older than that are
//! deleted by the periodic cleanup `open_store` starts; unfinished ones never are. Runs on
//! the backend of `DTM_TEST_STORE`.

use std::time::{Duration, Instant};

use chrono::Utc;
use dtm_core::store::WriteOp;
use dtm_proto::{Branch, TransGlobal};
use dtm_testkit::test_config;

fn global(gid: &str, status: &str, age_secs: i64) -> TransGlobal {
    let t = Utc::now() - chrono::Duration::seconds(age_secs);
    TransGlobal {
        gid: gid.into(),
        trans_type: "saga".into(),
        status: status.into(),
        protocol: "http".into(),
        create_time: Some(t),
        update_time: Some(t),
        options: r#"{"concurrent":false}"#.into(),
        next_cron_interval: 10,
        next_cron_time: Some(Utc::now() + chrono::Duration::days(1)),
        ..Default::default()
    }
}

#[tokio::test]
async fn finished_transactions_expire_unfinished_stay() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cfg = test_config(dir.path())?;
    cfg.set("Store.FinishedDataExpire", "2")
        .map_err(anyhow::Error::msg)?;
    let store = dtm_server::open_store(&cfg).await?;
    let rows = [
        ("ret-old-succeed", "succeed", 30, true),
        ("ret-old-failed", "failed", 30, true),
        ("ret-old-submitted", "submitted", 30, false),
        ("ret-old-prepared", "prepared", 30, false),
        ("ret-new-succeed", "succeed", -3600, false),
    ];
    for (gid, status, age, _) in rows {
        store
            .write(WriteOp::SaveNew {
                global: global(gid, status, age),
                branches: vec![Branch {
                    gid: gid.into(),
                    url: "http://127.0.0.1:1/x".into(),
                    branch_id: "01".into(),
                    op: "action".into(),
                    status: "prepared".into(),
                    ..Default::default()
                }],
            })
            .await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut settled = true;
        for (gid, _, _, gone) in rows {
            // the global before and after its branches: a purge between the reads
            // shows as a change of the global, and leaves nothing to compare
            let before = store.find_global(gid).await?.is_some();
            let has_branches = !store.find_branches(gid).await?.is_empty();
            let exists = store.find_global(gid).await?.is_some();
            if before == exists {
                assert_eq!(exists, has_branches, "{gid}: branches go with the global");
            }
            if gone == exists {
                settled = false;
            }
            if !gone {
                assert!(exists, "{gid} must stay");
            }
        }
        if settled {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "old finished transactions were not deleted within 10s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    store.close().await;
    if let Ok(o) = cfg.sql_options() {
        dtm_store::sql::drop_namespace(&o).await?;
    }
    if let Ok(o) = dtm_server::redis_config::options(&cfg) {
        dtm_store::redis_store::drop_prefix(&o).await?;
    }
    Ok(())
}
