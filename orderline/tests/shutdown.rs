//! SIGTERM ends `orderline serve` within seconds whatever clients hold open: a live status
//! stream (Server-Sent Events) gets a goodbye and is closed, and the process exits cleanly.
//! The stream itself is woken by the process's one listener, not by polling the database.

#![expect(
    clippy::unwrap_used,
    reason = "a test that cannot go on should fail loudly"
)]

use std::process::Command;
use std::time::Duration;

use api_common::auth::Role;

mod support;
use support::{
    drop_database, free_port, fresh_database, orderline, place_order, register_product, token,
    until, wait_ready,
};

/// Reads `response` until its text so far contains `needle` or the stream ends; the text read.
async fn read_until(response: &mut reqwest::Response, text: &mut String, needle: &str) -> bool {
    while !text.contains(needle) {
        match tokio::time::timeout(Duration::from_secs(30), response.chunk()).await {
            Ok(Ok(Some(bytes))) => text.push_str(&String::from_utf8_lossy(&bytes)),
            _ => return false,
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_open_status_streams_and_the_server_exits() {
    let (database, url) = fresh_database("orderline_shutdown").await;
    let client = reqwest::Client::new();
    let (ops, alice) = (token("ops", Role::Admin), token("alice", Role::Customer));
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = orderline(&url, port, &["serve"], &[]);
    wait_ready(&client, &base).await;
    register_product(&client, &base, &ops, "MUG", 100, 5).await;
    let order = place_order(&client, &base, &alice, &[("MUG", 1)], "tok_visa").await;
    // The read model shows the order within moments of its placement.
    let mut stream = loop {
        let response = client
            .get(format!("{base}/api/v1/orders/{order}/updates"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        if response.status() != 404 {
            break response;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stream.status(), 200);
    let mut text = String::new();
    // Pending, then confirmed by the saga: the stream was woken by the read model moving.
    assert!(
        read_until(&mut stream, &mut text, "confirmed").await,
        "no confirmation in {text:?}"
    );

    // A confirmed order's stream stays open; SIGTERM must end it and the server.
    let terminated = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let mut status = None;
    until("serve exits after SIGTERM with a stream open", async || {
        status = server.try_wait().unwrap();
        status.is_some()
    })
    .await;
    let status = status.unwrap();
    assert!(status.success(), "serve exited with {status}");
    assert!(
        read_until(&mut stream, &mut text, "shutting down").await,
        "no goodbye in {text:?}"
    );
    assert!(
        stream.chunk().await.map(|c| c.is_none()).unwrap_or(true),
        "the stream stays open"
    );

    drop_database(&database).await;
}
