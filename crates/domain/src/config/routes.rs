//! `[routes."/api/…"]`: asynchronous endpoints added to the built-in ones, or replacing one
//! whole (see [`crate::route_table`]).

use std::collections::BTreeMap;

use toml::Spanned;

use super::Invalid;
use crate::route_table::{RawRoute, RouteTable};

/// The built-in routes with the configured ones over them. `max_reference_images` is
/// `[upstream] max_reference_images`, the built-in image route's limit.
pub(super) fn routes(
    raw: BTreeMap<String, Spanned<RawRoute>>,
    max_reference_images: usize,
) -> Result<RouteTable, Invalid> {
    let configured = raw
        .into_iter()
        .map(|(path, route)| {
            let span = route.span();
            route
                .into_inner()
                .into_route(&path)
                .map_err(|why| Invalid::at(span, format!("[routes.\"{path}\"]: {why}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RouteTable::builtin(max_reference_images).with(configured))
}
