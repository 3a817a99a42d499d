//! Where configuration comes from: the file, the environment and the flags
//! (a figment provider over name/key/value triples).

use super::*;

/// A figment provider over `(name, key, value)` triples, whose metadata names
/// the environment variable or flag a key came from.
pub(super) struct MapProvider {
    pub(super) name: &'static str,
    pub(super) table: &'static [(&'static str, &'static str)],
    pub(super) values: Vec<(&'static str, String)>,
}

impl MapProvider {
    pub(super) fn new(
        name: &'static str,
        table: &'static [(&'static str, &'static str)],
        values: Vec<(&'static str, String)>,
    ) -> Self {
        Self {
            name,
            table,
            values,
        }
    }

    pub(super) fn from_env(env: &HashMap<String, String>) -> Self {
        let values = ENV_KEYS
            .iter()
            .filter_map(|(var, _)| {
                env.get(*var)
                    .filter(|v| !v.is_empty())
                    .map(|v| (*var, v.clone()))
            })
            .collect();
        Self::new("environment variable", ENV_KEYS, values)
    }

    /// Overrides are given by key directly; the table maps each key to itself.
    pub(super) fn overrides(values: &[(&'static str, String)]) -> Self {
        Self {
            name: "built-in override",
            table: &[],
            values: values.to_vec(),
        }
    }

    pub(super) fn key_of(&self, name: &'static str) -> &'static str {
        self.table
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(name, |(_, k)| k)
    }
}

impl Provider for MapProvider {
    fn metadata(&self) -> Metadata {
        let table = self.table;
        let name = self.name;
        Metadata::named(name).interpolater(move |_, keys| {
            let key = keys.join(".");
            match table.iter().find(|(_, k)| *k == key) {
                Some((var, _)) if name == "environment variable" => format!("${var}"),
                Some((flag, _)) => (*flag).to_owned(),
                None => format!("{name} {key}"),
            }
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut root = Dict::new();
        for (name, value) in &self.values {
            let key = self.key_of(name);
            insert_nested(&mut root, key, Value::from(value.clone()));
        }
        let mut map = Map::new();
        map.insert(Profile::Default, root);
        Ok(map)
    }
}

pub(super) fn insert_nested(dict: &mut Dict, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_nested(inner, rest, value);
            }
        }
    }
}
