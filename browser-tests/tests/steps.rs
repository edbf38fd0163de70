//! Each step's page in a real browser: what a reader sees after
//! `cargo xtask step NN`.

use axum_channels::testing::TestServer;
use browser_tests::Browser;

#[tokio::test]
async fn step_00_panels_say_which_step_adds_their_endpoint() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_00_skeleton::app()).await;
    browser.open(&format!("http://{}/", server.addr())).await;

    browser
        .wait_until(
            "document.querySelector('#system-status').dataset.state === 'missing'",
            "the system panel to learn /ws/system is not in this step",
        )
        .await;
    assert!(browser.text("#system-status").await.contains("step 01"));
    browser
        .wait_until(
            "document.querySelector('#room-status').dataset.state === 'missing'",
            "the room panel to learn /ws/room is not in this step",
        )
        .await;
    assert!(browser.text("#room-status").await.contains("step 02"));
    assert_eq!(
        browser
            .eval("document.querySelector('#system-send').disabled")
            .await,
        true
    );
    browser.close().await;
}

#[tokio::test]
async fn step_01_echoes_what_you_type() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_01_system_chat::app()).await;
    browser.open(&format!("http://{}/", server.addr())).await;

    browser
        .wait_until(
            "document.querySelector('#system-status').dataset.state === 'open'",
            "the system panel to connect",
        )
        .await;
    assert_eq!(
        browser.text("#system-status").await,
        "🔧 System: Connection established!"
    );
    browser.type_and_enter("#system-input", "hello").await;
    browser
        .wait_until(
            "document.querySelectorAll('#system-log li').length >= 3",
            "the echo to appear in the log",
        )
        .await;
    assert_eq!(
        browser.log("#system-log").await,
        [
            "🔧 System: Connection established!",
            "👤 User: hello",
            "🔧 System Echo: hello",
        ]
    );
    browser.close().await;
}

#[tokio::test]
async fn the_page_fits_a_phone_screen() {
    let Some(browser) = Browser::launch().await else {
        return;
    };
    let server = TestServer::start(step_01_system_chat::app()).await;
    browser.resize(360, 800).await;
    browser.open(&format!("http://{}/", server.addr())).await;
    browser
        .wait_until(
            "document.querySelector('#system-status').dataset.state === 'open'",
            "the system panel to connect",
        )
        .await;
    assert_eq!(
        browser
            .eval("document.documentElement.scrollWidth <= window.innerWidth")
            .await,
        true,
        "the page scrolls sideways at 360 px"
    );
    browser.close().await;
}
