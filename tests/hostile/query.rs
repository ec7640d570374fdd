//! Malformed query strings. Answers pinned down where PROTOCOL.md is silent: a query string the
//! extractor refuses (a repeated parameter) gets 400 `invalid_request` with the JSON body.

use tether::client::ConnectOptions;

use crate::scene;

#[tokio::test]
async fn repeated_and_malformed_query_parameters_get_a_json_error_not_a_crash() {
    let mut s = scene().await;
    let token = s.app.token("mallory");
    for query in [
        format!("token={token}&token={token}"),
        format!("token={token}&thread_id=a&thread_id=b"),
        format!("token={token}&since=1&since=2"),
        // `u64`'s parser takes a leading `+`; a `seq` is digits only.
        format!("token={token}&since=%2B5"),
    ] {
        let (status, body) = s
            .app
            .refused(ConnectOptions {
                query: Some(query.clone()),
                ..Default::default()
            })
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{query}"
        );
    }
    s.others_unaffected().await;
}
