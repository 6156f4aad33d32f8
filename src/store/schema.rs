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
        bucket -> Integer,
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
        fingerprint -> Text,
    }
}

diesel::table! {
    event_store (position) {
        position -> BigInt,
        stream_id -> Text,
        stream_version -> BigInt,
        event_id -> Text,
        event_name -> Text,
        schema_version -> Integer,
        payload -> Text,
        metadata -> Text,
        recorded_at -> BigInt,
    }
}

diesel::table! {
    snapshots (stream_id) {
        stream_id -> Text,
        stream_version -> BigInt,
        snapshot_version -> Integer,
        state -> Text,
        taken_at -> BigInt,
    }
}

diesel::table! {
    checkpoints (projection) {
        projection -> Text,
        position -> BigInt,
        updated_at -> BigInt,
    }
}
