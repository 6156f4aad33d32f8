//! Bounded REST on the real binaries: text fields and halls over their
//! limits get a 400 naming the field, lists come in pages linked by a
//! `Link` header, and a client's text never floods a log line.

mod myevents_support;

use myevents_support::*;
use serde_json::{json, Value};

/// The `Link: <...>; rel="next"` target of `response`, if any.
fn next_page(response: &Response) -> Option<String> {
    let link = response.header("Link")?;
    let (target, rel) = link.split_once(';')?;
    assert!(rel.contains("rel=\"next\""), "{link}");
    Some(target.trim().trim_matches(['<', '>']).to_owned())
}

/// Follows `path`'s pages; returns the ids of every item and the page count.
async fn walk(api: &Api, path: &str) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut next) = (Vec::new(), 0, Some(path.to_owned()));
    while let Some(path) = next {
        let page = api.get(&path).await;
        assert_eq!(page.status, 200, "{path}: {page:?}");
        ids.extend(
            page.json()
                .as_array()
                .unwrap()
                .iter()
                .map(|item| item["ID"].as_str().unwrap().to_owned()),
        );
        pages += 1;
        next = next_page(&page);
    }
    (ids, pages)
}

fn assert_names(response: &Response, field: &str) {
    assert_json_error(response, field);
    assert_eq!(response.status, 400, "{field}: {response:?}");
    let error = response.json()["error"].as_str().unwrap().to_owned();
    assert!(error.contains(field), "{field} not named in {error:?}");
}

#[actix_rt::test]
async fn over_long_text_and_too_many_halls_get_400_naming_the_field() {
    let vhost = herald_testkit::TestVhost::new();
    let dir = DataDir::new();
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let api = events.api;
    let location = |patch: Value| {
        let mut body = json!({"Name": "Stadthalle", "Address": "Marktplatz 1", "Country": "DE",
            "Halls": [{"name": "A", "capacity": 10}]});
        for (key, value) in patch.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    let long = |n: usize| "é".repeat(n);
    let halls = |n: usize| -> Value {
        (0..n)
            .map(|i| json!({"name": format!("hall {i}"), "capacity": 1}))
            .collect()
    };
    let cases = [
        // Just under the 64 KiB body limit.
        ("Name", location(json!({"Name": long(30 * 1024)}))),
        ("Address", location(json!({"Address": long(201)}))),
        ("Country", location(json!({"Country": long(65)}))),
        ("Halls", location(json!({"Halls": halls(17)}))),
        (
            "Halls[].name",
            location(json!({"Halls": [{"name": long(65), "capacity": 1}]})),
        ),
        // Limits are bytes of UTF-8: 51 characters of 2 bytes are too many.
        ("Name", location(json!({"Name": long(51)}))),
        ("Address", location(json!({"Address": "🎭".repeat(51)}))),
        // Control characters: JSON writes each as six bytes.
        ("Name", location(json!({"Name": "Stadt\u{0}halle"}))),
        ("Address", location(json!({"Address": "Markt\n\u{1b}[31m"}))),
        ("Country", location(json!({"Country": "D\u{7f}E"}))),
        (
            "Halls[].location",
            location(json!({"Halls": [{"name": "A", "location": "\u{85}", "capacity": 1}]})),
        ),
    ];
    for (field, body) in cases {
        assert_names(&api.post_json("/locations", &body).await, field);
    }
    // At the limits (100 and 200 bytes): accepted.
    let ok = api
        .post_json(
            "/locations",
            &location(json!({"Name": long(50), "Address": "🎭".repeat(50), "Halls": halls(16)})),
        )
        .await;
    assert_eq!(ok.status, 201, "{ok:?}");
    let location_id = ok.json()["ID"].as_str().unwrap().to_owned();
    let event = |patch: Value| {
        let mut body = json!({"Name": "Opera", "StartDate": START, "EndDate": END,
            "Location": {"ID": location_id}});
        for (key, value) in patch.as_object().unwrap() {
            body[key] = value.clone();
        }
        body
    };
    assert_names(
        &api.post_json("/events", &event(json!({"Name": long(101)})))
            .await,
        "Name",
    );
    assert_names(
        &api.post_json("/events", &event(json!({"Hall": long(65)})))
            .await,
        "Hall",
    );
    assert_names(
        &api.post_json("/events", &event(json!({"Location": {"ID": long(65)}})))
            .await,
        "Location.ID",
    );
    assert_names(
        &api.post_json("/events", &event(json!({"Name": long(51)})))
            .await,
        "Name",
    );
    assert_names(
        &api.post_json("/events", &event(json!({"Hall": "A\r\nB"})))
            .await,
        "Hall",
    );
    events.terminate().await;
}

#[actix_rt::test]
async fn lists_come_in_pages_linked_to_the_next_one() {
    let vhost = herald_testkit::TestVhost::new();
    let dir = DataDir::new();
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let api = events.api;
    let mut locations = Vec::new();
    for _ in 0..3 {
        locations.push(
            create_location(&api, json!([])).await["ID"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let mut created = Vec::new();
    for n in 0..5 {
        let event = create_event(&api, &format!("show {n}"), &locations[0], None).await;
        created.push(event["ID"].as_str().unwrap().to_owned());
    }

    // The default page holds them all, and says no more follow.
    let all = api.get("/events").await;
    assert_eq!(all.json().as_array().unwrap().len(), 5, "{all:?}");
    assert_eq!(all.header("Link"), None, "{all:?}");
    let (by_pages, pages) = walk(&api, "/events?limit=2").await;
    assert_eq!(pages, 3);
    let mut expected = created.clone();
    expected.sort(); // same start date: ordered by id
    assert_eq!(by_pages, expected);
    let (listed, pages) = walk(&api, "/locations?limit=2").await;
    assert_eq!((listed.len(), pages), (3, 2));

    for bad in ["/events?limit=0", "/events?limit=1001"] {
        assert_names(&api.get(bad).await, "limit");
    }
    let not_a_number = api.get("/events?limit=two").await;
    assert_json_error(&not_a_number, "limit=two");
    assert_names(&api.get("/locations?cursor=zz").await, "cursor");

    // An event's bookings, by pages too.
    let event = event_with_capacity(&api, "paged", 100).await;
    wait_until_booking_knows(&booking, &event).await;
    let mut booked = Vec::new();
    for _ in 0..3 {
        let answer = book(&booking.api, &event, 1).await;
        assert_eq!(answer.status, 201, "{answer:?}");
        booked.push(answer.json()["ID"].as_str().unwrap().to_owned());
    }
    let (listed, pages) = walk(&booking.api, &format!("{}?limit=2", bookings_path(&event))).await;
    assert_eq!(pages, 2);
    let (mut listed, mut booked) = (listed, booked);
    listed.sort();
    booked.sort();
    assert_eq!(listed, booked);
    booking.terminate().await;
    events.terminate().await;
}

/// A 60 KiB `user` is refused, and so is a short one with a line break (a
/// control character): neither reaches a log line.
#[actix_rt::test]
async fn a_clients_text_never_floods_or_breaks_a_log_line() {
    let vhost = herald_testkit::TestVhost::new();
    let dir = DataDir::new();
    let events = Service::start(Kind::Events, &vhost, &dir).await;
    let booking = Service::start(Kind::Booking, &vhost, &dir).await;
    let event = event_with_capacity(&events.api, "logged", 100).await;
    wait_until_booking_knows(&booking, &event).await;
    let path = bookings_path(&event);
    let flood = "u".repeat(60 * 1024);
    let refused = booking
        .api
        .post_json(&path, &json!({"seats": 1, "user": flood}))
        .await;
    assert_names(&refused, "user");
    let forged = "mallory\n[2026-01-01T00:00:00Z INFO  myevents::booking] forged";
    let refused = booking
        .api
        .post_json(&path, &json!({"seats": 1, "user": forged}))
        .await;
    assert_names(&refused, "user");
    let booked = booking
        .api
        .post_json(&path, &json!({"seats": 1, "user": "mallory"}))
        .await;
    assert_eq!(booked.status, 201, "{booked:?}");
    booking
        .terminate_and_check(|stderr| {
            assert!(!stderr.contains(&"u".repeat(300)), "a flood was logged");
            assert!(
                stderr.lines().all(|line| !line.starts_with("[2026-01-01")),
                "a forged log line: {stderr}"
            );
            assert!(!stderr.contains("forged"), "{stderr}");
            assert!(stderr.contains("mallory"), "{stderr}");
        })
        .await;
    events.terminate().await;
}
