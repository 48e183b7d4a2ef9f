//! Unit tests of `metrics`.
use super::*;

#[test]
fn usage_from_a_json_body_and_from_a_final_sse_chunk() {
    let mut t = UsageTail::default();
    t.push(br#"{"choices":[],"usage":{"completion_tokens":3,"prompt_tokens":10,"total_tokens":13}}"#);
    assert_eq!(t.usage(), Some(Usage { prompt: 10, completion: 3 }));
    let mut t = UsageTail::default();
    t.push(b"data: {\"choices\":[{\"delta\":{}}]}\n\n");
    t.push(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\": 7, \"completion_tokens\": 21}}\n\ndata: [DONE]\n\n");
    assert_eq!(t.usage(), Some(Usage { prompt: 7, completion: 21 }));
    // Azure's shape for current models: nested details before prompt_tokens (keys in alphabetical order).
    let mut t = UsageTail::default();
    t.push(br#"data: {"choices":[],"usage":{"completion_tokens":5,"completion_tokens_details":{"reasoning_tokens":0},"prompt_tokens":19,"prompt_tokens_details":{"cached_tokens":0},"total_tokens":24}}"#);
    t.push(b"\n\ndata: [DONE]\n\n");
    assert_eq!(t.usage(), Some(Usage { prompt: 19, completion: 5 }));
    // The Responses API's final event, and an embeddings answer (no completion tokens).
    let mut t = UsageTail::default();
    t.push(b"event: response.created\ndata: {\"response\":{\"usage\":null}}\n\n");
    t.push(br#"event: response.completed
data: {"type":"response.completed","response":{"output":[],"usage":{"input_tokens":11,"input_tokens_details":{"cached_tokens":0},"output_tokens":4,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":15},"user":null}}"#);
    assert_eq!(t.usage(), Some(Usage { prompt: 11, completion: 4 }));
    let mut t = UsageTail::default();
    t.push(
        br#"{"object":"list","data":[],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
    );
    assert_eq!(t.usage(), Some(Usage { prompt: 8, completion: 0 }));
    // Only chunks with "usage": null so far.
    let mut t = UsageTail::default();
    t.push(b"data: {\"choices\":[{\"delta\":{\"content\":\"{\"}}],\"usage\":null}\n\n");
    assert_eq!(t.usage(), None);
    let mut t = UsageTail::default();
    t.push(&vec![b'x'; 10_000]);
    assert_eq!(t.usage(), None);
    assert!(t.buf.len() <= USAGE_TAIL_BYTES);
}

#[test]
fn route_classes() {
    assert_eq!(route_class("/openai/deployments/x/chat/completions"), "chat");
    assert_eq!(route_class("/openai/deployments/x/completions"), "completions");
    assert_eq!(route_class("/openai/v1/responses"), "responses");
    assert_eq!(route_class("/openai/models"), "other");
    assert_eq!(route_class("/healthz"), "admin");
    assert_eq!(route_class("/x"), "not_found");
}

#[test]
fn exposition_format() {
    let probes = Probes { queue_depth: Some(Box::new(|| 2)), ..Probes::default() };
    probes.open_connections.store(5, Ordering::Relaxed);
    probes.workers.live.store(7, Ordering::Relaxed);
    let m = Metrics::with_probes(probes);
    m.request("chat", 200, "team-a", Duration::from_millis(30));
    m.attempt("we\"ird", "429", Duration::from_millis(5));
    m.tokens("east", "gpt-4o", "team-a", Usage { prompt: 10, completion: 3 });
    let text = m.render(&Gauges { blocked_clients: 0, instances: vec![("east", true)] });
    for gauge in ["azure_proxy_queue_depth 2\n", "azure_proxy_open_connections 5\n", "azure_proxy_worker_threads 7\n"] {
        assert!(text.contains(gauge), "{gauge}: {text}");
    }
    assert!(text.contains("azure_proxy_requests_total{route=\"chat\",status=\"200\",client=\"team-a\"} 1\n"), "{text}");
    assert!(text.contains("instance=\"we\\\"ird\""), "{text}");
    assert!(text.contains("azure_proxy_request_duration_seconds_bucket{le=\"0.05\"} 1\n"), "{text}");
    assert!(text.contains("azure_proxy_request_duration_seconds_bucket{le=\"+Inf\"} 1\n"), "{text}");
    assert!(text.contains(
        "azure_proxy_tokens_total{instance=\"east\",deployment=\"gpt-4o\",client=\"team-a\",kind=\"prompt\"} 10"
    ));
    assert!(text.contains("azure_proxy_instance_available{instance=\"east\"} 1"));
    for line in text.lines() {
        assert!(line.starts_with('#') || line.starts_with("azure_proxy_"), "{line}");
    }
}

#[test]
fn number_after_reads_what_str_parse_would() {
    let text = r#"{"usage": {"prompt_tokens" :  12, "completion_tokens":7,"big":18446744073709551615,"huge":18446744073709551616}}"#;
    assert_eq!(number_after(text, "\"prompt_tokens\""), Some(12));
    assert_eq!(number_after(text, "\"completion_tokens\""), Some(7));
    assert_eq!(number_after(text, "\"big\""), Some(u64::MAX));
    assert_eq!(number_after(text, "\"huge\""), None, "past u64::MAX");
    assert_eq!(number_after(text, "\"total_tokens\""), None, "absent");
    assert_eq!(number_after(r#""a": x"#, "\"a\""), None, "not a number");
    assert_eq!(number_after(r#""a" 5"#, "\"a\""), None, "no colon");
    assert_eq!(number_after(r#""a":"#, "\"a\""), None, "nothing after");
    assert_eq!(number_after("", "\"a\""), None);
    assert_eq!(number_after("\"a\": 3", ""), None, "an empty key finds nothing");
}
