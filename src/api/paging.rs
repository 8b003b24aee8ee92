//! Paging of the `List*` RPCs, all alike: items ordered by a key, at most `page_size` of them
//! (0 means [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`]) and at most [`PAGE_BYTES`] of
//! encoded answer per page, so no amount of stored data makes a list exceed a client's default
//! 4 MiB message limit. The page token is the last key of the page (keyset paging): a page
//! read after items were added or removed neither repeats nor skips the items that stayed.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tonic::Status;

use super::status::bad_page_token;

/// Items per page when the request says 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Most items per page.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Most encoded bytes of items per page (the rest of a response is small): under a client's
/// default 4 MiB limit with room to spare.
pub const PAGE_BYTES: usize = 3 * 1024 * 1024;

const TOKEN_PREFIX: &str = "k1.";

/// The request's paging fields.
#[derive(Clone, Debug, Default)]
pub struct PageRequest<'a> {
    /// `page_size` as sent.
    pub page_size: u32,
    /// `page_token` as sent.
    pub page_token: &'a str,
}

/// One page of converted items and the token of the next (empty on the last page).
#[derive(Debug)]
pub struct Page<P> {
    /// The page's items, in key order.
    pub items: Vec<P>,
    /// The `next_page_token` to answer.
    pub next_page_token: String,
}

/// The key after which a page starts, from the request's token.
fn after(token: &str) -> Result<Option<String>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || bad_page_token("not a token this server issued for this list");
    let encoded = token.strip_prefix(TOKEN_PREFIX).ok_or_else(bad)?;
    let bytes = URL_SAFE_NO_PAD.decode(encoded).map_err(|_| bad())?;
    String::from_utf8(bytes).map(Some).map_err(|_| bad())
}

fn token_for(key: &str) -> String {
    format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(key))
}

/// Cuts one page out of `items` (in any order; each with its key, unique per list): the
/// items whose key follows the token's, in key order, converted by `convert`, within the
/// request's size and [`PAGE_BYTES`] (at least one item per page, each item being bounded by
/// the field limits).
pub fn page<T, P: prost::Message>(
    items: impl IntoIterator<Item = (String, T)>,
    request: PageRequest<'_>,
    convert: impl Fn(T) -> P,
) -> Result<Page<P>, Status> {
    let size = match request.page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    } as usize;
    let after = after(request.page_token)?;
    let mut rest: Vec<(String, T)> = items
        .into_iter()
        .filter(|(k, _)| after.as_ref().is_none_or(|a| k > a))
        .collect();
    // Only the first size + 1 need ordering: select them, then sort that part.
    if rest.len() > size + 1 {
        rest.select_nth_unstable_by(size, |a, b| a.0.cmp(&b.0));
        rest.truncate(size + 1);
    }
    rest.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let more = rest.len() > size;
    let mut out = Vec::with_capacity(rest.len().min(size));
    let mut bytes = 0usize;
    let mut last_key = None;
    let mut cut = false;
    for (key, item) in rest.into_iter().take(size) {
        let p = convert(item);
        let len = p.encoded_len() + 8;
        if !out.is_empty() && bytes + len > PAGE_BYTES {
            cut = true;
            break;
        }
        bytes += len;
        out.push(p);
        last_key = Some(key);
    }
    let next_page_token = match last_key {
        Some(k) if more || cut => token_for(&k),
        _ => String::new(),
    };
    Ok(Page {
        items: out,
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_pages(keys: &[&str], page_size: u32) -> Vec<Vec<String>> {
        let mut token = String::new();
        let mut pages = Vec::new();
        loop {
            let p = page(
                keys.iter().map(|k| (k.to_string(), k.to_string())),
                PageRequest {
                    page_size,
                    page_token: &token,
                },
                |s| s,
            )
            .unwrap();
            pages.push(p.items);
            if p.next_page_token.is_empty() {
                return pages;
            }
            token = p.next_page_token;
        }
    }

    #[test]
    fn pages_cover_every_item_once_in_key_order() {
        let keys = ["e", "a", "d", "b", "c"];
        assert_eq!(
            all_pages(&keys, 2),
            vec![vec!["a", "b"], vec!["c", "d"], vec!["e"]]
        );
        assert_eq!(all_pages(&keys, 5), vec![vec!["a", "b", "c", "d", "e"]]);
        assert_eq!(all_pages(&[], 0), vec![Vec::<String>::new()]);
    }

    #[test]
    fn size_is_defaulted_and_capped() {
        let keys: Vec<String> = (0..2500).map(|i| format!("{i:05}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let pages = all_pages(&refs, 0);
        assert_eq!(pages[0].len(), DEFAULT_PAGE_SIZE as usize);
        assert_eq!(pages.len(), 25);
        let pages = all_pages(&refs, u32::MAX);
        assert_eq!(
            pages.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![1000, 1000, 500]
        );
    }

    #[test]
    fn a_page_stays_under_the_byte_budget() {
        let big = "x".repeat(100 * 1024);
        let p = page(
            (0..100).map(|i| (format!("{i:03}"), big.clone())),
            PageRequest {
                page_size: 1000,
                page_token: "",
            },
            |s| s,
        )
        .unwrap();
        assert!(p.items.len() < 100 && !p.items.is_empty());
        assert!(p.items.iter().map(String::len).sum::<usize>() <= PAGE_BYTES);
        assert!(!p.next_page_token.is_empty());
    }

    #[test]
    fn foreign_tokens_are_refused() {
        for bad in ["x", "k1.***", "k1._w", "abc"] {
            let e = page(
                [("a".to_string(), "a".to_string())],
                PageRequest {
                    page_size: 1,
                    page_token: bad,
                },
                |s| s,
            )
            .unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }
}
