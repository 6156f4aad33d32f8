//! The booking context's tables (`migrations/*_myevents`).

diesel::table! {
    known_locations (id) {
        id -> Text,
        name -> Text,
        address -> Text,
        country -> Text,
        halls -> Text,
    }
}

diesel::table! {
    known_events (id) {
        id -> Text,
        name -> Text,
        location_id -> Text,
        start_date -> Text,
        end_date -> Text,
        hall -> Nullable<Text>,
        capacity -> Nullable<BigInt>,
        seats_booked -> BigInt,
    }
}

diesel::table! {
    bookings (id) {
        id -> Text,
        event_id -> Text,
        user_id -> Text,
        seats -> BigInt,
        booked_at -> BigInt,
    }
}
