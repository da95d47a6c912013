//! Names the config, producers and operators give to Redis keys: one rule for all of them.

/// What a queue name (or the key prefix) must be; the text every error about one says.
pub(crate) const NAME_RULE: &str = "must be non-empty and contain no white space";

/// Whether `name` can name a queue or prefix a key: white space in one is a typo (`TASK_QUEUES`
/// is split on commas and trimmed), and an empty one is no key at all.
pub(crate) fn is_key_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_without_white_space() {
        assert!(is_key_name("task_queue_1"));
        assert!(is_key_name("{qsys}:q1"));
        assert!(!is_key_name(""));
        assert!(!is_key_name("q 1"));
        assert!(!is_key_name("q1\n"));
    }
}
