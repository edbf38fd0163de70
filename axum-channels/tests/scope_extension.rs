//! What an app shares through axum's `Extension` reaches its consumers'
//! `Scope`, the WebSocket handshake included.

use axum::{Extension, Router};
use axum_channels::testing::TestServer;
use axum_channels::{Consumer, Frame, NoEvents, Result, Scope, Socket, route};

/// Something an app shares with its consumers, as step 03 shares its job
/// queue.
#[derive(Clone)]
struct Greeting(&'static str);

/// Greets with the app's `Greeting`, or says that there is none.
struct Greeter {
    greeting: Option<Greeting>,
}

impl Consumer for Greeter {
    type Event = NoEvents;

    fn new(scope: &Scope) -> Self {
        Greeter {
            greeting: scope.extension::<Greeting>().cloned(),
        }
    }

    async fn connect(&mut self, socket: &mut Socket) -> Result<()> {
        socket.accept().await?;
        let text = self.greeting.as_ref().map_or("no greeting", |g| g.0);
        socket.send_text(text).await
    }

    async fn receive(&mut self, _socket: &mut Socket, _frame: Frame) -> Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn a_consumer_finds_what_the_app_shares() {
    let app = Router::new()
        .route("/ws/greet", route::<Greeter>())
        .layer(Extension(Greeting("hello from the app")));
    let server = TestServer::start(app).await;
    let mut client = server.connect("/ws/greet").await;
    assert_eq!(client.recv_text().await, "hello from the app");
}

#[tokio::test]
async fn without_it_the_consumer_gets_none() {
    let app = Router::new().route("/ws/greet", route::<Greeter>());
    let server = TestServer::start(app).await;
    let mut client = server.connect("/ws/greet").await;
    assert_eq!(client.recv_text().await, "no greeting");
}
