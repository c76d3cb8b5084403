//! Links and addresses over rtnetlink (the `rtnetlink` crate): the bridge, tap ports,
//! addresses. Every request has a deadline; "already there" and "already gone" answers are
//! turned into success where the caller wants idempotence.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};
use thiserror::Error;

use super::mac::Mac;

/// Deadline of one netlink request.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(5);
const ENODEV: i32 = nix::errno::Errno::ENODEV as i32;
const EEXIST: i32 = nix::errno::Errno::EEXIST as i32;

/// Errors talking to the kernel over netlink.
#[derive(Debug, Error)]
pub enum LinkError {
    #[error("cannot open a netlink socket")]
    Connect(#[source] std::io::Error),
    #[error("netlink {operation} failed")]
    Request {
        operation: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("netlink {operation} did not answer within {timeout:?}")]
    Timeout {
        operation: String,
        timeout: Duration,
    },
}

impl LinkError {
    /// The errno of a kernel refusal, if that is what this is.
    pub(crate) fn errno(&self) -> Option<i32> {
        match self {
            LinkError::Request {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => Some(msg.raw_code().abs()),
            _ => None,
        }
    }
}

/// What we need to know about a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    /// `bridge`, `tun`, ... (`None` for physical devices and loopback).
    pub(crate) kind: Option<String>,
    pub(crate) mac: Option<Mac>,
    /// The bridge this link is a port of.
    pub(crate) master: Option<u32>,
    pub(crate) up: bool,
    pub(crate) alias: Option<String>,
}

impl Link {
    pub(crate) fn is_bridge(&self) -> bool {
        self.kind.as_deref() == Some("bridge")
    }

    pub(crate) fn is_tun(&self) -> bool {
        self.kind.as_deref() == Some("tun")
    }

    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            kind: None,
            mac: None,
            master: None,
            up: msg.header.flags.contains(LinkFlags::Up),
            alias: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                LinkAttribute::Address(bytes) => {
                    link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(Mac);
                }
                LinkAttribute::Controller(m) => link.master = Some(*m),
                LinkAttribute::IfAlias(a) => link.alias = Some(a.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let LinkInfo::Kind(kind) = info {
                            link.kind = Some(kind_name(kind));
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

fn kind_name(kind: &InfoKind) -> String {
    match kind {
        InfoKind::Bridge => "bridge".into(),
        InfoKind::Tun => "tun".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A netlink connection in the caller's network namespace.
pub(crate) struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn with_deadline<T>(
    operation: impl Into<String>,
    fut: impl Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, LinkError> {
    let operation = operation.into();
    match tokio::time::timeout(NETLINK_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(LinkError::Request { operation, source }),
        Err(_) => Err(LinkError::Timeout {
            operation,
            timeout: NETLINK_TIMEOUT,
        }),
    }
}

impl Netlink {
    /// Open a connection; must be called inside a Tokio runtime.
    pub(crate) fn connect() -> Result<Netlink, LinkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
        let task = tokio::spawn(connection);
        Ok(Netlink { handle, task })
    }

    /// Every link of the namespace.
    pub(crate) async fn links(&self) -> Result<Vec<Link>, LinkError> {
        let msgs: Vec<LinkMessage> = with_deadline(
            "list links",
            self.handle.link().get().execute().try_collect(),
        )
        .await?;
        Ok(msgs.iter().map(Link::from_message).collect())
    }

    /// The link called `name`, if there is one.
    pub(crate) async fn link(&self, name: &str) -> Result<Option<Link>, LinkError> {
        let result: Result<Vec<LinkMessage>, LinkError> = with_deadline(
            format!("get link {name}"),
            self.handle
                .link()
                .get()
                .match_name(name.to_string())
                .execute()
                .try_collect(),
        )
        .await;
        match result {
            Ok(msgs) => Ok(msgs.first().map(Link::from_message)),
            Err(e) if e.errno() == Some(ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Create a bridge with a fixed MAC (so it never changes as ports come and go), up.
    pub(crate) async fn create_bridge(&self, name: &str, mac: Mac) -> Result<(), LinkError> {
        let msg = LinkBridge::new(name).address(mac.0.to_vec()).up().build();
        match with_deadline(
            format!("create bridge {name}"),
            self.handle.link().add(msg).execute(),
        )
        .await
        {
            Err(e) if e.errno() == Some(EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Bring a link up.
    pub(crate) async fn set_up(&self, index: u32) -> Result<(), LinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        with_deadline(
            format!("set link {index} up"),
            self.handle.link().set(msg).execute(),
        )
        .await
    }

    /// Make a link a port of `master`, label it with `alias`, and bring it up.
    pub(crate) async fn enslave_up(
        &self,
        index: u32,
        master: u32,
        alias: &str,
    ) -> Result<(), LinkError> {
        let msg = LinkUnspec::new_with_index(index)
            .controller(master)
            .alias(alias.to_string())
            .up()
            .build();
        with_deadline(
            format!("attach link {index} to bridge {master}"),
            self.handle.link().set(msg).execute(),
        )
        .await
    }

    /// Delete a link; a link that is already gone is fine.
    pub(crate) async fn delete(&self, index: u32) -> Result<(), LinkError> {
        match with_deadline(
            format!("delete link {index}"),
            self.handle.link().del(index).execute(),
        )
        .await
        {
            Err(e) if e.errno() == Some(ENODEV) => Ok(()),
            other => other,
        }
    }

    /// Delete the link called `name` if it exists. Returns whether something was deleted.
    pub(crate) async fn delete_by_name(&self, name: &str) -> Result<bool, LinkError> {
        match self.link(name).await? {
            Some(link) => self.delete(link.index).await.map(|()| true),
            None => Ok(false),
        }
    }

    /// The IPv4 addresses on a link, with their prefix lengths.
    pub(crate) async fn ipv4_addresses(
        &self,
        index: u32,
    ) -> Result<Vec<(Ipv4Addr, u8)>, LinkError> {
        let msgs: Vec<AddressMessage> = with_deadline(
            format!("list addresses of link {index}"),
            self.handle
                .address()
                .get()
                .set_link_index_filter(index)
                .execute()
                .try_collect(),
        )
        .await?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.index == index)
            .filter_map(|m| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some((*ip, m.header.prefix_len)),
                    _ => None,
                })
            })
            .collect())
    }

    /// Add an address to a link; already having it is fine.
    pub(crate) async fn add_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), LinkError> {
        match with_deadline(
            format!("add {ip}/{prefix} to link {index}"),
            self.handle
                .address()
                .add(index, IpAddr::V4(ip), prefix)
                .execute(),
        )
        .await
        {
            Err(e) if e.errno() == Some(EEXIST) => Ok(()),
            other => other,
        }
    }
}
