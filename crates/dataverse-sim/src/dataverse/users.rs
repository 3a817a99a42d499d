//! Users and impersonation: `CallerObjectId` (an Entra object id) or
//! `MSCRMCallerID` (a systemuserid) makes the application user act as
//! another user, as Dataverse does (docs/dataverse.md, "Impersonation"):
//! the user must exist in the org, the application user needs the
//! `prvActOnBehalfOfAnotherUser` privilege, `WhoAmI` answers the user, and
//! records carry the user as creator and the application user as
//! `createdonbehalfby`.

use super::*;

/// Who a request acts as.
#[derive(Clone, Copy)]
pub(super) struct Acting {
    /// The user whose roles apply (the application user without impersonation).
    pub(super) user: Uuid,
    /// The application user, when it acts on behalf of `user`.
    pub(super) on_behalf_of: Option<Uuid>,
}

/// The user a user's own token (on-behalf-of) names: its `oid`.
#[derive(Clone)]
pub(super) struct TokenUser(pub(super) String);

/// The acting user of a request, or Dataverse's error. A user's own token
/// is that user, with the user's roles and nobody acting on its behalf.
pub(super) fn acting(
    sim: &SimState,
    headers: &HeaderMap,
    token_user: Option<&TokenUser>,
) -> Result<Acting, Response> {
    if let Some(TokenUser(oid)) = token_user {
        return Ok(Acting {
            user: by_object_id(sim, oid)?,
            on_behalf_of: None,
        });
    }
    let app_user = sim.ids.user;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let user = match (header("callerobjectid"), header("mscrmcallerid")) {
        (None, None) => {
            return Ok(Acting {
                user: app_user,
                on_behalf_of: None,
            });
        }
        (Some(oid), _) => by_object_id(sim, oid)?,
        (None, Some(id)) => by_systemuserid(sim, id)?,
    };
    if !sim
        .impersonation_privilege
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return Err(dv_error(
            StatusCode::FORBIDDEN,
            "0x80040220",
            &format!(
                "Principal user (Id={app_user}, type=8, roleCount=1, privilegeCount=0, accessMode=4) is missing prvActOnBehalfOfAnotherUser privilege (Id=00000000-0000-0000-0000-000000000000) on OTC=8 for entity 'systemuser'."
            ),
        ));
    }
    Ok(Acting {
        user,
        on_behalf_of: Some(app_user),
    })
}

fn parse_guid(value: &str, header: &str) -> Result<Uuid, Response> {
    Uuid::parse_str(value.trim()).map_err(|_| {
        dv_error(
            StatusCode::BAD_REQUEST,
            "0x80040203",
            &format!("The {header} header value '{value}' is not a valid Guid."),
        )
    })
}

fn by_object_id(sim: &SimState, oid: &str) -> Result<Uuid, Response> {
    let oid = parse_guid(oid, "CallerObjectId")?;
    lock(&sim.users).get(&oid).copied().ok_or_else(|| {
        dv_error(
            StatusCode::BAD_REQUEST,
            "0x80040217",
            &format!("systemuser With Id = {oid} Does Not Exist (azureactivedirectoryobjectid)"),
        )
    })
}

fn by_systemuserid(sim: &SimState, id: &str) -> Result<Uuid, Response> {
    let id = parse_guid(id, "MSCRMCallerID")?;
    if lock(&sim.users).values().any(|u| *u == id) {
        Ok(id)
    } else {
        Err(dv_error(
            StatusCode::BAD_REQUEST,
            "0x80040217",
            &format!("systemuser With Id = {id} Does Not Exist"),
        ))
    }
}
