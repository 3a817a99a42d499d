//! The simulated org's tables: schemas, seeded rows, stored files.

use super::*;

/// A table's shape.
pub(crate) struct Schema {
    pub(crate) entity_set: &'static str,
    pub(crate) logical: &'static str,
    pub(crate) id_field: &'static str,
    /// Columns a row may have (besides the id and the file columns).
    pub(crate) columns: &'static [&'static str],
    pub(crate) file_columns: &'static [&'static str],
    /// Single-valued navigations: a lookup column naming a row of another
    /// table (many-to-one).
    pub(crate) lookups: &'static [Lookup],
    /// Collection-valued navigations: the rows of another table whose
    /// lookup names this row (one-to-many).
    pub(crate) relations: &'static [Relation],
}

/// A many-to-one navigation: `nav` follows `column` (`_x_value`) to a row of `target`.
pub(crate) struct Lookup {
    pub(crate) nav: &'static str,
    pub(crate) column: &'static str,
    pub(crate) target: &'static str,
}

/// A one-to-many navigation: `nav` gives the rows of `target` whose
/// `column` names this row.
pub(crate) struct Relation {
    pub(crate) nav: &'static str,
    pub(crate) target: &'static str,
    pub(crate) column: &'static str,
}

pub(crate) const SCHEMAS: &[Schema] = &[
    Schema {
        entity_set: "accounts",
        logical: "account",
        id_field: "accountid",
        columns: &[
            "name",
            "accountnumber",
            "telephone1",
            "address1_city",
            "revenue",
            "numberofemployees",
            "creditonhold",
            "description",
            "createdon",
            "modifiedon",
            "statecode",
        ],
        file_columns: &["dvp_document"],
        lookups: &[Lookup {
            nav: "primarycontactid",
            column: "_primarycontactid_value",
            target: "contacts",
        }],
        relations: &[Relation {
            nav: "contact_customer_accounts",
            target: "contacts",
            column: "_parentcustomerid_value",
        }],
    },
    Schema {
        entity_set: "contacts",
        logical: "contact",
        id_field: "contactid",
        columns: &[
            "firstname",
            "lastname",
            "fullname",
            "emailaddress1",
            "jobtitle",
            "telephone1",
            "createdon",
            "modifiedon",
            "statecode",
        ],
        file_columns: &[],
        lookups: &[Lookup {
            nav: "parentcustomerid_account",
            column: "_parentcustomerid_value",
            target: "accounts",
        }],
        relations: &[],
    },
    Schema {
        entity_set: "leads",
        logical: "lead",
        id_field: "leadid",
        columns: &[
            "subject",
            "firstname",
            "lastname",
            "fullname",
            "companyname",
            "emailaddress1",
            "leadqualitycode",
            "createdon",
            "modifiedon",
            "statecode",
        ],
        file_columns: &["dvp_document"],
        lookups: &[],
        relations: &[],
    },
];

/// Lookups every table has, set by the simulator (never by a caller): who
/// created or last changed a row, and on whose behalf (impersonation).
pub(crate) const AUDIT_COLUMNS: [&str; 3] = [
    "_createdby_value",
    "_createdonbehalfby_value",
    "_modifiedby_value",
];

impl Schema {
    /// The columns a row shows: its own, its lookups, then the audit lookups.
    pub(crate) fn all_columns(&self) -> impl Iterator<Item = &'static str> {
        self.columns
            .iter()
            .copied()
            .chain(self.lookups.iter().map(|l| l.column))
            .chain(AUDIT_COLUMNS)
    }

    /// The table a navigation of this one leads to, and whether it is a
    /// collection.
    pub(crate) fn navigation(&self, nav: &str) -> Option<(&'static Schema, bool)> {
        if let Some(l) = self.lookups.iter().find(|l| l.nav == nav) {
            return schema(l.target).map(|t| (t, false));
        }
        let r = self.relations.iter().find(|r| r.nav == nav)?;
        schema(r.target).map(|t| (t, true))
    }
}

pub(crate) fn schema(entity_set: &str) -> Option<&'static Schema> {
    SCHEMAS.iter().find(|s| s.entity_set == entity_set)
}

#[derive(Clone)]
pub(crate) struct StoredFile {
    pub(crate) name: String,
    pub(crate) data: Bytes,
}

#[derive(Clone)]
pub(crate) struct Row {
    pub(crate) fields: Map<String, Value>,
    pub(crate) version: u64,
    pub(crate) files: HashMap<String, StoredFile>,
}

/// The in-memory database.
#[derive(Clone)]
pub(crate) struct Db {
    pub(crate) tables: HashMap<&'static str, BTreeMap<Uuid, Row>>,
    pub(crate) next_version: u64,
    /// Deleted rows, for change tracking.
    pub(crate) deleted: Vec<Deleted>,
}

/// A deleted row: its table, id and the version of its deletion.
#[derive(Clone)]
pub(crate) struct Deleted {
    pub(crate) set: &'static str,
    pub(crate) id: Uuid,
    pub(crate) version: u64,
}

pub(crate) const FIRST: &[&str] = &[
    "Yvonne", "Susanna", "Nancy", "Maria", "Sidney", "Scott", "Paul", "Rene", "Susan", "Patrick",
    "Thomas", "Rachel", "Jim", "Robert", "Cathan", "Alex", "Anne", "Brian", "Darren", "Eva",
];
pub(crate) const LAST: &[&str] = &[
    "McKay",
    "Stubberod",
    "Anderson",
    "Campbell",
    "Higa",
    "Konersmann",
    "Cannon",
    "Valdes",
    "Burk",
    "Sands",
    "Andersen",
    "Kim",
    "Glynn",
    "Lyon",
    "Cook",
    "Wu",
    "Weber",
    "Moreno",
];
pub(crate) const COMPANIES: &[&str] = &[
    "Fourth Coffee",
    "Litware, Inc.",
    "Adventure Works",
    "Fabrikam, Inc.",
    "Blue Yonder Airlines",
    "City Power & Light",
    "Contoso Pharmaceuticals",
    "Alpine Ski House",
    "A. Datum Corporation",
    "Coho Winery",
    "Northwind Traders",
    "Tailspin Toys",
    "Wingtip Toys",
    "Proseware, Inc.",
    "Trey Research",
    "Woodgrove Bank",
    "Lucerne Publishing",
    "Margie's Travel",
    "Humongous Insurance",
    "Graphic Design Institute",
];
pub(crate) const JOBS: &[&str] = &["Purchasing Manager", "Owner", "CFO", "Buyer"];
pub(crate) const CITIES: &[&str] = &[
    "Redmond",
    "Seattle",
    "Dallas",
    "Lynnwood",
    "Los Angeles",
    "Phoenix",
    "Santa Cruz",
    "Renton",
];
pub(crate) const SUBJECTS: &[&str] = &[
    "Interested in online-only store",
    "New store opened this year - follow up",
    "Wants to expand",
    "Likes our new products",
    "Store is expanding - send new catalogue",
    "Needs quote for coffee machines",
    "Requested product demo",
    "Evaluating a three-year contract",
];

impl Db {
    /// A database with plausible sample rows.
    pub(crate) fn seeded() -> Self {
        let mut db = Self {
            tables: SCHEMAS
                .iter()
                .map(|s| (s.entity_set, BTreeMap::new()))
                .collect(),
            next_version: 71_000_000,
            deleted: Vec::new(),
        };
        let created = utc_timestamp(now_epoch() - 86_400 * 30).replace(' ', "T");
        for i in 0..20 {
            let company = COMPANIES[i % COMPANIES.len()];
            db.insert_seed(
                "accounts",
                json!({
                    "name": company,
                    "accountnumber": format!("ACC-{:05}", 1000 + i),
                    "telephone1": format!("555-01{:02}", i),
                    "address1_city": CITIES[i % CITIES.len()],
                    "revenue": 100_000.0 * (i as f64 + 1.0),
                    "numberofemployees": 10 * (i + 1),
                    "creditonhold": i % 7 == 0,
                    "createdon": created,
                    "modifiedon": created,
                    "statecode": 0,
                }),
            );
        }
        for i in 0..30 {
            let (first, last) = (FIRST[i % FIRST.len()], LAST[(i * 7) % LAST.len()]);
            db.insert_seed(
                "contacts",
                json!({
                    "firstname": first,
                    "lastname": last,
                    "fullname": format!("{first} {last} (sample)"),
                    "emailaddress1": format!("{}.{}@example.com", first.to_lowercase(), last.to_lowercase()),
                    "jobtitle": JOBS[i % JOBS.len()],
                    "telephone1": format!("555-02{:02}", i),
                    "createdon": created,
                    "modifiedon": created,
                    "statecode": 0,
                }),
            );
        }
        db.relate_seeds();
        for i in 0..25 {
            let (first, last) = (FIRST[(i * 3) % FIRST.len()], LAST[(i * 5) % LAST.len()]);
            db.insert_seed(
                "leads",
                json!({
                    "subject": SUBJECTS[i % SUBJECTS.len()],
                    "firstname": first,
                    "lastname": last,
                    "fullname": format!("{first} {last}"),
                    "companyname": COMPANIES[(i * 3) % COMPANIES.len()],
                    "emailaddress1": format!("{}@{}.example.com", first.to_lowercase(), last.to_lowercase()),
                    "leadqualitycode": 1 + i % 3,
                    "createdon": created,
                    "modifiedon": created,
                    "statecode": 0,
                }),
            );
        }
        db
    }

    /// Each seeded account's primary contact is a contact of its own, and
    /// each contact's company (parent customer) an account.
    fn relate_seeds(&mut self) {
        let accounts = self.ids("accounts");
        let contacts = self.ids("contacts");
        for (i, contact) in contacts.iter().enumerate() {
            let Some(account) = accounts.get(i % accounts.len().max(1)) else {
                break;
            };
            if let Some(row) = self
                .tables
                .get_mut("contacts")
                .and_then(|t| t.get_mut(contact))
            {
                row.fields
                    .insert("_parentcustomerid_value".into(), json!(account.to_string()));
            }
            if i < accounts.len()
                && let Some(row) = self
                    .tables
                    .get_mut("accounts")
                    .and_then(|t| t.get_mut(account))
            {
                row.fields
                    .insert("_primarycontactid_value".into(), json!(contact.to_string()));
            }
        }
    }

    pub(crate) fn insert_seed(&mut self, set: &'static str, fields: Value) {
        let Value::Object(fields) = fields else {
            return;
        };
        let version = self.bump();
        if let Some(t) = self.tables.get_mut(set) {
            t.insert(
                Uuid::new_v4(),
                Row {
                    fields,
                    version,
                    files: HashMap::new(),
                },
            );
        }
    }

    pub(crate) fn bump(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    pub(crate) fn seed_rows(&mut self, set: &str, n: usize) {
        let Some(schema) = schema(set) else {
            return;
        };
        for i in 0..n {
            let fields = match schema.entity_set {
                "accounts" => {
                    json!({"name": format!("{} #{i}", COMPANIES[i % COMPANIES.len()]), "accountnumber": format!("GEN-{i:06}"), "statecode": 0})
                }
                "contacts" => {
                    json!({"firstname": FIRST[i % FIRST.len()], "lastname": format!("Generated{i}"), "fullname": format!("{} Generated{i}", FIRST[i % FIRST.len()]), "statecode": 0})
                }
                _ => {
                    json!({"subject": format!("{} #{i}", SUBJECTS[i % SUBJECTS.len()]), "lastname": format!("Generated{i}"), "statecode": 0})
                }
            };
            self.insert_seed(schema.entity_set, fields);
        }
    }

    pub(crate) fn put_file(
        &mut self,
        set: &str,
        id: Uuid,
        column: &str,
        name: &str,
        data: Bytes,
    ) -> bool {
        let Some(row) = self.tables.get_mut(set).and_then(|t| t.get_mut(&id)) else {
            return false;
        };
        row.files.insert(
            column.to_owned(),
            StoredFile {
                name: name.to_owned(),
                data,
            },
        );
        true
    }

    pub(crate) fn file(&self, set: &str, id: Uuid, column: &str) -> Option<Bytes> {
        let row = self.tables.get(set)?.get(&id)?;
        row.files.get(column).map(|f| f.data.clone())
    }

    pub(crate) fn ids(&self, set: &str) -> Vec<Uuid> {
        self.tables
            .get(set)
            .map(|t| t.keys().copied().collect())
            .unwrap_or_default()
    }

    pub(crate) fn row(&self, set: &str, id: Uuid) -> Option<Value> {
        self.tables
            .get(set)?
            .get(&id)
            .map(|r| Value::Object(r.fields.clone()))
    }
}

/// A chunked file upload in progress (docs/dataverse.md, "File columns").
pub(crate) struct Upload {
    pub(crate) entity_set: &'static str,
    pub(crate) id: Uuid,
    pub(crate) column: String,
    pub(crate) name: String,
    pub(crate) data: Vec<u8>,
}

/// Chunk size the simulator asks for, as Dataverse does.
pub(crate) const UPLOAD_CHUNK: usize = 4 * 1024 * 1024;
