//! The events context's tables (`migrations/*_myevents`).

diesel::table! {
    locations (id) {
        id -> Text,
        name -> Text,
        address -> Text,
        country -> Text,
        open_time -> Integer,
        close_time -> Integer,
        halls -> Text,
    }
}

diesel::table! {
    events (id) {
        id -> Text,
        name -> Text,
        duration -> Integer,
        start_date -> BigInt,
        end_date -> BigInt,
        location_id -> Text,
        hall -> Nullable<Text>,
        capacity -> Nullable<Integer>,
        seats_booked -> BigInt,
    }
}

diesel::joinable!(events -> locations (location_id));
diesel::allow_tables_to_appear_in_same_query!(events, locations);
