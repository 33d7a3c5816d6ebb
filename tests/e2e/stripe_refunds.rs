//! `charge.refunded` on a credit-pack purchase: the credits are clawed back pro rata to the
//! refunded share, cumulatively (partial refunds add up to the whole pack), once per refund
//! state, even below zero; the next purchase pays the debt first.

use reqwest::StatusCode;
use serde_json::json;

use crate::ledger_util::get;
use crate::stripe_util::*;

async fn buy(w: &World, acct: &str, pack: &str, amount_cents: i64) -> String {
    let pi = id("pi");
    let mut session = pack_session(acct, pack, &id("cs_test"), &pi);
    session["amount_total"] = json!(amount_cents);
    deliver_ok(
        &w.app,
        &event("checkout.session.completed", session, now()),
        "applied",
    )
    .await;
    pi
}

#[tokio::test]
async fn refunds_claw_back_pro_rata_once_per_refund_state() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let pi = buy(&w, &acct, "pack_100", 1000).await;
    assert_eq!(state(&w.app, &acct).await.1, 110 * C);
    let ch = id("ch");

    // A quarter refunded: a quarter of the 110 credits (bonus included) comes back.
    let quarter = event("charge.refunded", charge(&ch, &pi, 1000, 250), now());
    deliver_ok(&w.app, &quarter, "applied").await;
    assert_eq!(state(&w.app, &acct).await.1, 82_500_000);
    deliver_ok(&w.app, &quarter, "duplicate").await;
    let mut same_state = quarter.clone();
    same_state["id"] = json!(id("evt"));
    deliver_ok(&w.app, &same_state, "already_applied").await;
    assert_eq!(state(&w.app, &acct).await.1, 82_500_000);

    // The rest refunded: exactly the remaining credits, whatever the rounding.
    deliver_ok(
        &w.app,
        &event("charge.refunded", charge(&ch, &pi, 1000, 1000), now()),
        "applied",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.1, 0);
    // An intermediate state arriving after the full refund: nothing.
    deliver_ok(
        &w.app,
        &event("charge.refunded", charge(&ch, &pi, 1000, 500), now()),
        "stale",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.1, 0);

    let adjustments = journal_of(&w, &acct, "adjustment").await;
    assert_eq!(
        adjustments,
        vec![
            (format!("refund:{ch}:250"), 0, -27_500_000),
            (format!("refund:{ch}:1000"), 0, -82_500_000),
        ]
    );
    let pg = w.env.pg().await;
    let (refunded, clawed): (i64, i64) = sqlx::query_as(
        "SELECT refunded_cents, clawed_back FROM purchases WHERE payment_intent_id = $1",
    )
    .bind(&pi)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!((refunded, clawed), (1000, 110 * C));
}

#[tokio::test]
async fn a_refund_can_take_the_balance_below_zero_and_the_next_purchase_pays_the_debt() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let (_, key) = w.app.create_key(&acct).await;
    let pi = buy(&w, &acct, "pack_100", 1000).await;
    // Spend the allowance (10) and 5 purchased credits.
    for _ in 0..15 {
        assert_eq!(get(&w.app, &key, "/x").await.status, StatusCode::OK);
    }
    assert_eq!(state(&w.app, &acct).await.1, 105 * C);
    deliver_ok(
        &w.app,
        &event("charge.refunded", charge(&id("ch"), &pi, 1000, 1000), now()),
        "applied",
    )
    .await;
    let (allowance, purchased, _, _) = state(&w.app, &acct).await;
    assert_eq!((allowance, purchased), (0, -5 * C));
    let a = get(&w.app, &key, "/x").await;
    a.assert_error(402, "insufficient_credits");

    // The next pack first pays the 5 owed.
    buy(&w, &acct, "pack_small", 100).await;
    assert_eq!(state(&w.app, &acct).await.1, 0);
    buy(&w, &acct, "pack_100", 1000).await;
    assert_eq!(state(&w.app, &acct).await.1, 110 * C);
    assert_eq!(get(&w.app, &key, "/x").await.status, StatusCode::OK);
    // balance = sum of the journal, with the adjustment in it.
    assert_eq!(journal_of(&w, &acct, "adjustment").await.len(), 1);
}

#[tokio::test]
async fn refunds_of_other_charges_are_ignored() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    buy(&w, &acct, "pack_small", 100).await;
    // A charge tollgate knows nothing about (another product, a subscription invoice).
    let mut other = charge(&id("ch"), &id("pi"), 4900, 4900);
    other["metadata"] = json!({"account_id": acct});
    deliver_ok(&w.app, &event("charge.refunded", other, now()), "ignored").await;
    let orphan = charge(&id("ch"), &id("pi"), 4900, 4900);
    deliver_ok(&w.app, &event("charge.refunded", orphan, now()), "ignored").await;
    assert_eq!(state(&w.app, &acct).await.1, 5 * C);
}
