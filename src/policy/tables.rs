//! The org's tables as its `$metadata` (CSDL) describes them: entity sets,
//! their entity types, each type's navigation properties and where they
//! lead, and logical names (FetchXML's) mapped to entity sets. What the
//! table policy needs to name every table a request reaches.

use std::collections::{HashMap, HashSet};

/// One entity type: its navigation properties (lower-case name → target
/// type, lower-case) and its structural properties (lower-case).
#[derive(Debug, Default)]
struct EntityType {
    navigations: HashMap<String, String>,
    properties: HashSet<String>,
    base: Option<String>,
}

/// The tables of one org, read from its CSDL.
#[derive(Debug, Default)]
pub struct TableMap {
    /// Entity set (lower-case) → entity type name (lower-case).
    sets: HashMap<String, String>,
    /// Entity type (its logical name, lower-case) → the entity set.
    set_of_type: HashMap<String, String>,
    types: HashMap<String, EntityType>,
}

/// The org's tables as last read, or why they could not be, and until
/// when that answer stands (then the org's `$metadata` is read again).
#[derive(Debug)]
pub struct Loaded {
    /// The map last read; kept through a failed refresh.
    pub map: Option<std::sync::Arc<TableMap>>,
    /// Why the last read failed, if it did.
    pub failure: Option<String>,
    pub until: tokio::time::Instant,
}

/// Why a CSDL document could not be read.
#[derive(Debug, thiserror::Error)]
#[error("the org's $metadata cannot be read: {0}")]
pub struct CsdlError(String);

impl TableMap {
    /// Reads a CSDL document (`GET $metadata`).
    pub fn from_csdl(xml: &str) -> Result<Self, CsdlError> {
        let options = roxmltree::ParsingOptions {
            allow_dtd: false,
            ..roxmltree::ParsingOptions::default()
        };
        let doc = roxmltree::Document::parse_with_options(xml, options)
            .map_err(|e| CsdlError(e.to_string()))?;
        let mut map = Self::default();
        for node in doc.descendants().filter(roxmltree::Node::is_element) {
            match node.tag_name().name() {
                "EntityType" => map.add_type(node),
                "EntitySet" => {
                    let (Some(name), Some(ty)) =
                        (node.attribute("Name"), node.attribute("EntityType"))
                    else {
                        continue;
                    };
                    let (set, ty) = (name.to_ascii_lowercase(), unqualified(ty));
                    map.set_of_type.insert(ty.clone(), set.clone());
                    map.sets.insert(set, ty);
                }
                _ => {}
            }
        }
        if map.sets.is_empty() {
            return Err(CsdlError("it names no entity set".to_owned()));
        }
        Ok(map)
    }

    fn add_type(&mut self, node: roxmltree::Node<'_, '_>) {
        let Some(name) = node.attribute("Name") else {
            return;
        };
        let mut ty = EntityType {
            base: node.attribute("BaseType").map(unqualified),
            ..EntityType::default()
        };
        for child in node.children().filter(roxmltree::Node::is_element) {
            let Some(prop) = child.attribute("Name") else {
                continue;
            };
            match child.tag_name().name() {
                "NavigationProperty" => {
                    let target = child.attribute("Type").unwrap_or("");
                    let target = target
                        .strip_prefix("Collection(")
                        .and_then(|t| t.strip_suffix(')'))
                        .unwrap_or(target);
                    ty.navigations
                        .insert(prop.to_ascii_lowercase(), unqualified(target));
                }
                "Property" => {
                    ty.properties.insert(prop.to_ascii_lowercase());
                }
                _ => {}
            }
        }
        self.types.insert(name.to_ascii_lowercase(), ty);
    }

    /// The entity type of an entity set (lower-case), if it is one.
    pub fn type_of_set(&self, set: &str) -> Option<&str> {
        self.sets.get(set).map(String::as_str)
    }

    /// The entity set holding rows of `ty` (a logical name, lower-case).
    pub fn set_of_type(&self, ty: &str) -> Option<&str> {
        self.set_of_type.get(ty).map(String::as_str)
    }

    /// Where navigation property `nav` (lower-case) of `ty` leads: the
    /// target entity type, looked up along the type's base types.
    pub fn navigation<'a>(&'a self, ty: &str, nav: &str) -> Option<&'a str> {
        self.along_bases(ty, |t| t.navigations.get(nav).map(String::as_str))
    }

    /// Every navigation target of `ty` (what `$expand=*` reaches).
    pub fn all_navigations(&self, ty: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut next = Some(ty);
        for _ in 0..8 {
            let Some(t) = next.and_then(|n| self.types.get(n)) else {
                break;
            };
            out.extend(t.navigations.values().map(String::as_str));
            next = t.base.as_deref();
        }
        out
    }

    /// Whether `prop` (lower-case) is a structural property of `ty`.
    pub fn has_property(&self, ty: &str, prop: &str) -> bool {
        self.along_bases(ty, |t| t.properties.contains(prop).then_some(()))
            .is_some()
    }

    fn along_bases<'a, T>(
        &'a self,
        ty: &str,
        find: impl Fn(&'a EntityType) -> Option<T>,
    ) -> Option<T> {
        let mut next = self.types.get_key_value(ty).map(|(k, _)| k.as_str());
        // Base chains in Dataverse are two deep (crmbaseentity); bounded anyway.
        for _ in 0..8 {
            let t = self.types.get(next?)?;
            if let Some(found) = find(t) {
                return Some(found);
            }
            next = t.base.as_deref();
        }
        None
    }
}

/// `Microsoft.Dynamics.CRM.contact` or `mscrm.contact` → `contact`.
fn unqualified(name: &str) -> String {
    name.rsplit('.').next().unwrap_or(name).to_ascii_lowercase()
}

/// A small CSDL of two related tables, for the policy's tests.
#[cfg(test)]
pub(crate) const TEST_CSDL: &str = r#"<?xml version="1.0"?><edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices><Schema Namespace="Microsoft.Dynamics.CRM" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">
<EntityType Name="crmbaseentity" Abstract="true"/>
<EntityType Name="account" BaseType="mscrm.crmbaseentity"><Key><PropertyRef Name="accountid"/></Key><Property Name="accountid" Type="Edm.Guid"/><Property Name="name" Type="Edm.String"/><NavigationProperty Name="primarycontactid" Type="mscrm.contact"/><NavigationProperty Name="contact_customer_accounts" Type="Collection(mscrm.contact)"/></EntityType>
<EntityType Name="contact" BaseType="mscrm.crmbaseentity"><Property Name="fullname" Type="Edm.String"/><NavigationProperty Name="parentcustomerid_account" Type="mscrm.account"/></EntityType>
<EntityContainer Name="System"><EntitySet Name="accounts" EntityType="Microsoft.Dynamics.CRM.account"/><EntitySet Name="contacts" EntityType="Microsoft.Dynamics.CRM.contact"/></EntityContainer></Schema></edmx:DataServices></edmx:Edmx>"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_types_and_navigations_are_read() {
        let map = TableMap::from_csdl(TEST_CSDL).expect("csdl");
        assert_eq!(map.type_of_set("accounts"), Some("account"));
        assert_eq!(map.set_of_type("contact"), Some("contacts"));
        assert_eq!(
            map.navigation("account", "primarycontactid"),
            Some("contact")
        );
        assert_eq!(
            map.navigation("account", "contact_customer_accounts"),
            Some("contact")
        );
        assert!(map.has_property("account", "name"));
        assert!(!map.has_property("account", "primarycontactid"));
        assert!(TableMap::from_csdl("<not csdl").is_err());
    }
}
