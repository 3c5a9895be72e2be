//! The broker addresses of `AMQP_URL` (one node, or the nodes of a cluster) and the
//! order in which skald tries them.
//!
//! `AMQP_URL` holds one URL or several separated by commas (spaces around them are
//! ignored; a comma inside a password is written `%2C`). skald connects to the first
//! that answers. When its node goes away, it tries the *next* one in the list (wrapping
//! around), not the first again: a node that just stopped is the least likely to
//! answer, and every process of a deployment does not pile back onto one node.

/// The addresses of `amqp_url`, in order; why the value is unusable otherwise.
pub fn addresses(amqp_url: &str) -> Result<Vec<String>, String> {
    let list: Vec<String> = amqp_url.split(',').map(|a| a.trim().to_string()).collect();
    for address in &list {
        if address.is_empty() {
            return Err("an empty address in the comma-separated list".into());
        }
        if !(address.starts_with("amqp://") || address.starts_with("amqps://")) {
            return Err(format!(
                "{address:?} is not an amqp:// or amqps:// URL (several addresses are \
                 separated by commas)"
            ));
        }
    }
    Ok(list)
}

/// The first address of `amqp_url` (for tools that need one node: `skald bench`'s
/// baseline worker).
pub fn first(amqp_url: &str) -> String {
    amqp_url
        .split(',')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The order in which to try `count` addresses after address `current` was (or is
/// about to be) the one in use: `current` first when `stay` (it was never lost, or
/// nothing was connected yet), otherwise starting with the one after it.
pub fn attempt_order(count: usize, current: usize, stay: bool) -> Vec<usize> {
    let start = if stay { current } else { current + 1 };
    (0..count).map(|i| (start + i) % count.max(1)).collect()
}

/// `address` without its password, for logs and errors.
pub fn redacted(address: &str) -> String {
    match (address.find("://"), address.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &address[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}:***{}", &address[..scheme + 3], &address[at..])
        }
        _ => address.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_or_a_comma_separated_list() {
        assert_eq!(
            addresses("amqp://g:g@a:5672/%2f").unwrap(),
            ["amqp://g:g@a:5672/%2f"]
        );
        assert_eq!(
            addresses("amqp://a:1/%2f , amqps://b:2/%2f").unwrap(),
            ["amqp://a:1/%2f", "amqps://b:2/%2f"]
        );
        assert!(addresses("amqp://a:1/%2f,").is_err());
        assert!(addresses("a:5672").unwrap_err().contains("amqp://"));
    }

    #[test]
    fn a_lost_node_is_tried_last() {
        assert_eq!(attempt_order(3, 0, true), [0, 1, 2]);
        assert_eq!(attempt_order(3, 0, false), [1, 2, 0]);
        assert_eq!(attempt_order(3, 2, false), [0, 1, 2]);
        assert_eq!(attempt_order(1, 0, false), [0]);
    }

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redacted("amqp://h:5672"), "amqp://h:5672");
    }
}
