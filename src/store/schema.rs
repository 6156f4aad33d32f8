//! diesel table definitions, matching `migrations/`.

diesel::table! {
    outbox (position) {
        position -> BigInt,
        event_id -> Text,
        event_name -> Text,
        partition_key -> Text,
        schema_version -> Integer,
        correlation_id -> Nullable<Text>,
        causation_id -> Nullable<Text>,
        producer -> Nullable<Text>,
        occurred_at -> BigInt,
        payload -> Binary,
        status -> Text,
        attempts -> Integer,
        last_error -> Nullable<Text>,
        published_at -> Nullable<BigInt>,
    }
}

diesel::table! {
    inbox (consumer, dedupe_key) {
        consumer -> Text,
        dedupe_key -> Text,
        event_name -> Text,
        received_at -> BigInt,
    }
}

diesel::table! {
    idempotency (scope, key) {
        scope -> Text,
        key -> Text,
        status -> Integer,
        body -> Text,
        created_at -> BigInt,
    }
}
