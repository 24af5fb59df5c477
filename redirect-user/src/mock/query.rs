//! A request's query parameters, as the metadata services read them.

use std::borrow::Cow;

/// `application/x-www-form-urlencoded` pairs of a query string; the first of a repeated key
/// counts.
pub struct Params<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'a> Params<'a> {
    pub fn parse(query: Option<&'a str>) -> Self {
        Params(
            query
                .map(|q| form_urlencoded::parse(q.as_bytes()).collect())
                .unwrap_or_default(),
        )
    }

    pub fn get(&self, key: &str) -> Option<Cow<'a, str>> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    /// A flag's value compared case-insensitively: cloud-init sends `recursive=True`.
    pub fn flag(&self, key: &str) -> bool {
        self.get(key)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_keeps_the_first() {
        let p = Params::parse(Some(
            "resource=https://management.azure.com&a=%2F&a=2&x=True&bad=%zz",
        ));
        assert_eq!(
            p.get("resource").as_deref(),
            Some("https://management.azure.com")
        );
        assert_eq!(p.get("a").as_deref(), Some("/"));
        assert!(p.flag("x"));
        assert_eq!(p.get("bad").as_deref(), Some("%zz"));
        assert!(p.get("nope").is_none());
        assert!(Params::parse(None).get("a").is_none());
    }
}
