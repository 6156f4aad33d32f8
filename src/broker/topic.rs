//! RabbitMQ topic-exchange matching: words separated by `.`, `*` matches one
//! word, `#` matches zero or more.

/// Whether `routing_key` matches the binding `pattern`.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    matches(&pattern, &key)
}

fn matches(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| matches(rest, &key[skip..])),
        Some((word, rest)) => match key.split_first() {
            Some((first, key_rest)) => (*word == "*" || word == first) && matches(rest, key_rest),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn exact_words_match_only_themselves() {
        assert!(topic_matches("eventCreated", "eventCreated"));
        assert!(!topic_matches("eventCreated", "eventBooked"));
        assert!(!topic_matches("a.b", "a.b.c"));
    }

    #[test]
    fn star_matches_exactly_one_word() {
        assert!(topic_matches("a.*.c", "a.b.c"));
        assert!(!topic_matches("a.*", "a"));
        assert!(!topic_matches("a.*", "a.b.c"));
    }

    #[test]
    fn hash_matches_zero_or_more_words() {
        assert!(topic_matches("#", "anything.at.all"));
        assert!(topic_matches("a.#", "a"));
        assert!(topic_matches("a.#", "a.b.c"));
        assert!(topic_matches("#.c", "a.b.c"));
        assert!(topic_matches("a.#.c", "a.c"));
        assert!(!topic_matches("a.#.c", "a.b.d"));
    }
}
