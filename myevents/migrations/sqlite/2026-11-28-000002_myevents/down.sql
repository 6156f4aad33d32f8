DROP TABLE bookings;
DROP TABLE known_events;
DROP TABLE known_locations;
DROP TABLE events;
DROP TABLE locations;
