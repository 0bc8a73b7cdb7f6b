//! `[models."…"]`: the upstream models teams may use and what a task of each reserves.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Invalid;
use crate::pricing::Reserve;

/// One `[models."…"]` table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    reserve: Reserve,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub name: String,
    /// The most a request for it may cost, from the request's fields (see [`Reserve`]).
    pub reserve: Reserve,
}

/// The models by upstream id; at least one, since a gateway without one could serve nothing.
pub(super) fn models(raw: BTreeMap<String, RawModel>) -> Result<BTreeMap<String, Model>, Invalid> {
    if raw.is_empty() {
        return Err(Invalid::new(
            None,
            "no [models.\"…\"] table: list at least one model with its reserve",
        ));
    }
    Ok(raw
        .into_iter()
        .map(|(name, model)| {
            let model = Model {
                name: name.clone(),
                reserve: model.reserve,
            };
            (name, model)
        })
        .collect())
}
