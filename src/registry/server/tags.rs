//! Tag listing: `GET /v2/<name>/tags/list`, sorted, paginated with `n` and `last`; a
//! truncated page carries a `Link: <...>; rel="next"` header.

use std::collections::HashMap;

use axum::{
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

use super::{
    error::{ErrorCode, ErrorResponse, Result},
    manifests::name_unknown,
    routes::{RepoName, Tag},
    Registry,
};

/// One page of a sorted tag list: at most `n` tags strictly after `last`, and whether more
/// follow.
pub fn paginate<'a>(sorted: &'a [Tag], n: Option<usize>, last: Option<&str>) -> (&'a [Tag], bool) {
    let start = match last {
        Some(last) => sorted.partition_point(|t| t.as_str() <= last),
        None => 0,
    };
    let rest = &sorted[start..];
    match n {
        Some(n) if n < rest.len() => (&rest[..n], true),
        _ => (rest, false),
    }
}

/// `GET /v2/<name>/tags/list[?n=N][&last=T]`.
pub async fn list(registry: &Registry, repo: &RepoName, query: &HashMap<String, String>) -> Result<Response> {
    let n = query
        .get("n")
        .map(|n| {
            n.parse::<usize>().map_err(|_| {
                ErrorResponse::new(ErrorCode::PaginationNumberInvalid, format!("invalid n {n:?}"))
                    .with_detail(serde_json::json!({ "n": n }))
            })
        })
        .transpose()?;
    let last = query.get("last").map(String::as_str);
    let tags = registry
        .storage
        .tags(repo)
        .await
        .map_err(|e| ErrorResponse::internal("listing tags", e))?
        .ok_or_else(|| name_unknown(repo))?;
    let (page, more) = paginate(&tags, n, last);
    let body = serde_json::json!({
        "name": repo.as_str(),
        "tags": page.iter().map(Tag::as_str).collect::<Vec<_>>(),
    });
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    if let (true, Some(n), Some(last_shown)) = (more, n, page.last()) {
        let link = format!(
            "</v2/{repo}/tags/list?n={n}&last={}>; rel=\"next\"",
            last_shown.as_str()
        );
        response.headers_mut().insert(
            header::LINK,
            HeaderValue::from_str(&link).expect("names and tags are ascii"),
        );
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(names: &[&str]) -> Vec<Tag> {
        names.iter().map(|t| Tag::parse(t).unwrap()).collect()
    }

    fn names(page: &[Tag]) -> Vec<&str> {
        page.iter().map(Tag::as_str).collect()
    }

    #[test]
    fn pages() {
        let all = tags(&["a", "b", "c", "d", "e"]);
        let (page, more) = paginate(&all, None, None);
        assert_eq!((names(page), more), (vec!["a", "b", "c", "d", "e"], false));
        let (page, more) = paginate(&all, Some(2), None);
        assert_eq!((names(page), more), (vec!["a", "b"], true));
        let (page, more) = paginate(&all, Some(2), Some("b"));
        assert_eq!((names(page), more), (vec!["c", "d"], true));
        let (page, more) = paginate(&all, Some(2), Some("d"));
        assert_eq!((names(page), more), (vec!["e"], false));
        // Exactly n left: no next page.
        let (page, more) = paginate(&all, Some(2), Some("c"));
        assert_eq!((names(page), more), (vec!["d", "e"], false));
        // `last` need not be a tag that exists.
        let (page, more) = paginate(&all, None, Some("bb"));
        assert_eq!((names(page), more), (vec!["c", "d", "e"], false));
        let (page, more) = paginate(&all, Some(0), None);
        assert_eq!((names(page), more), (vec![], true));
        let (page, _) = paginate(&all, Some(3), Some("z"));
        assert!(page.is_empty());
    }
}
