//! UPnP IGD actions that igd-next does not offer: GetSpecificPortMappingEntry (WANIPConnection:1 and :2,
//! WANPPPConnection:1) and GetListOfPortMappings (WANIPConnection:2 only). Each action is split into a pure
//! request builder, a pure response parser, and a thin async call over igd-next's own HTTP transport, so
//! that the parsers can be tested on recorded answers and fuzzed without a network.
//!
//! The parsers read what any device on the LAN may send, so they never panic and bound what they accept:
//! the body (1 MiB, the limit of igd-next's transport), XML nesting depth and element count, the number of
//! listed entries (4096) and every text field. A DTD is refused outright: SOAP 1.1 forbids one in a
//! message, and it is the door to entity-expansion bombs. Values that cannot be right (port 0, a port
//! above 65535, an unknown protocol) make the answer malformed; nothing is guessed or defaulted, except an
//! absent description, which reads as empty.
//!
//! XML parser: xml-rs (crate `xml-rs`), already in the dependency tree under igd-next's `xmltree`, used
//! directly as a pull parser. `xmltree` itself builds an unbounded tree before we could look at it;
//! driving xml-rs ourselves lets us stop at the first limit crossed (depth, element count, DTD). roxmltree
//! or quick-xml would be new crates for no gain at these sizes, and using the same parser as igd-next
//! means a gateway whose XML igd-next accepts (e.g. with properly bound namespace prefixes) is accepted
//! here too.
use std::{net::SocketAddr, time::Duration};

use igd_next::{
    aio::{tokio::Tokio, Gateway as IgdNextGateway, Provider},
    RequestError,
};
use xml::{
    reader::{ParserConfig, XmlEvent},
    Encoding, EventReader,
};

use super::{AddError, GatewayEntry};
use crate::Protocol;

/// Largest answer parsed: igd-next's transport refuses bigger HTTP bodies anyway, so this only bounds
/// callers that feed the parsers directly (tests, fuzzing).
pub const MAX_RESPONSE_BYTES: usize = 1024 * 1024;
/// Most entries accepted from one GetListOfPortMappings answer; also the most a request may ask for.
pub const MAX_LISTED_ENTRIES: usize = 4096;
/// Longest text accepted in a field (description, internal client, error description, number).
/// miniupnpd keeps 64 bytes of description; other gateways a few hundred.
pub const MAX_FIELD_BYTES: usize = 1024;
/// An internal client is an address or a host name (at most 253 bytes in DNS).
const MAX_INTERNAL_CLIENT_BYTES: usize = 255;
/// SOAP answers nest 6 deep at most (Envelope/Body/Fault/detail/UPnPError/errorCode).
const MAX_XML_DEPTH: usize = 16;
/// A full listing is 1 + 4096 entries of 9 elements: room for that and for unknown extra fields.
const MAX_XML_ELEMENTS: usize = 65_536;

/// UPnP error 714 NoSuchEntryInArray: the asked-for mapping does not exist.
pub const UPNP_NO_SUCH_ENTRY_IN_ARRAY: u16 = 714;
/// UPnP error 730 PortMappingNotFound: IGDv2's answer to a listing with nothing in range.
pub const UPNP_PORT_MAPPING_NOT_FOUND: u16 = 730;

const GET_SPECIFIC_PORT_MAPPING_ENTRY: &str = "GetSpecificPortMappingEntry";
const GET_LIST_OF_PORT_MAPPINGS: &str = "GetListOfPortMappings";

/// Why a SOAP call did not produce an answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SoapError {
    /// The gateway answered with a SOAP Fault carrying a UPnPError.
    #[error("the gateway answered UPnP error {code} {description:?}")]
    Upnp { code: u16, description: String },
    /// The gateway answered, but not with a usable SOAP message (also: an HTTP error page, since
    /// igd-next's transport hands over the body without the status).
    #[error("malformed answer from the gateway: {0}")]
    Malformed(String),
    /// The gateway could not be reached (connection refused, reset, timeout): rediscover it.
    #[error("the gateway did not answer: {0}")]
    Transport(String),
    /// The request itself could not be formed (port 0, a service type or control URL we will not use).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl From<SoapError> for AddError {
    fn from(error: SoapError) -> Self {
        match error {
            SoapError::Transport(reason) => AddError::Unreachable(reason),
            other => AddError::Refused(other.to_string()),
        }
    }
}

/// A SOAP request ready for the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SoapRequest {
    /// Value of the `SOAPAction` HTTP header: `"<service type>#<action>"`, quotes included.
    pub soap_action: String,
    /// The SOAP envelope.
    pub body: String,
}

/// What a GetListOfPortMappings call asks for: mappings of one protocol with an external port in
/// `start_port..=end_port`, at most `max_entries` of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortListingQuery {
    pub protocol: Protocol,
    pub start_port: u16,
    pub end_port: u16,
    /// NewNumberOfPorts; 1..=[`MAX_LISTED_ENTRIES`]. (The wire value 0, "all", is not sent: the answer
    /// could hold more than we accept.)
    pub max_entries: u16,
}

/// The output arguments of a successful action (the children of `<u:ActionResponse>`), in document
/// order, each name present once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SoapArguments(Vec<(String, String)>);

impl SoapArguments {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, value)| value.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(name, value)| (name.as_str(), value.as_str()))
    }

    fn require(&self, name: &str, context: &str) -> Result<&str, SoapError> {
        self.get(name).ok_or_else(|| SoapError::Malformed(format!("{context}: {name} is missing")))
    }
}

// ---------------------------------------------------------------------------------------------------
// Request builders

/// GetSpecificPortMappingEntry for `external_port`/`protocol` with the wildcard remote host (the only
/// kind of mapping natbinder makes).
pub fn build_get_specific_port_mapping_entry_request(
    service_type: &str,
    protocol: Protocol,
    external_port: u16,
) -> Result<SoapRequest, SoapError> {
    if external_port == 0 {
        return Err(SoapError::InvalidRequest("external port 0 is a wildcard, not a mapping to look up".into()));
    }
    build_soap_request(
        service_type,
        GET_SPECIFIC_PORT_MAPPING_ENTRY,
        &[
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", external_port.to_string()),
            ("NewProtocol", wire_protocol(protocol).to_owned()),
        ],
    )
}

/// GetListOfPortMappings (WANIPConnection:2) with NewManage=1: every mapping in the range, not only this
/// host's. Gateways that do not let this host see the others answer 606, or list only this host's.
pub fn build_get_list_of_port_mappings_request(
    service_type: &str,
    query: &PortListingQuery,
) -> Result<SoapRequest, SoapError> {
    if query.start_port == 0 || query.start_port > query.end_port {
        return Err(SoapError::InvalidRequest(format!(
            "port range {}..={} is empty or starts at 0",
            query.start_port, query.end_port
        )));
    }
    if query.max_entries == 0 || usize::from(query.max_entries) > MAX_LISTED_ENTRIES {
        return Err(SoapError::InvalidRequest(format!(
            "asking for {} entries: ask for 1 to {MAX_LISTED_ENTRIES} and page by start port",
            query.max_entries
        )));
    }
    build_soap_request(
        service_type,
        GET_LIST_OF_PORT_MAPPINGS,
        &[
            ("NewStartPort", query.start_port.to_string()),
            ("NewEndPort", query.end_port.to_string()),
            ("NewProtocol", wire_protocol(query.protocol).to_owned()),
            ("NewManage", "1".to_owned()),
            ("NewNumberOfPorts", query.max_entries.to_string()),
        ],
    )
}

/// Protocol names are upper case on the wire (some gateways reject "tcp").
fn wire_protocol(protocol: Protocol) -> &'static str {
    match protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
    }
}

/// The service type comes from the gateway's description document: it goes into an HTTP header and an
/// XML attribute, so anything that could break out of either is refused (and it is escaped anyway).
fn check_service_type(service_type: &str) -> Result<(), SoapError> {
    let acceptable = !service_type.is_empty()
        && service_type.len() <= 256
        && service_type.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'#');
    if acceptable {
        Ok(())
    } else {
        Err(SoapError::InvalidRequest(format!("unusable service type {}", excerpt(service_type))))
    }
}

/// `arguments` are (element name, value); names are our constants, values are escaped here.
pub(super) fn build_soap_request(
    service_type: &str,
    action: &str,
    arguments: &[(&str, String)],
) -> Result<SoapRequest, SoapError> {
    check_service_type(service_type)?;
    let mut body = String::with_capacity(512);
    body.push_str(
        "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
         s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>",
    );
    body.push_str(&format!("<u:{action} xmlns:u=\"{}\">", xml_escape(service_type)));
    for (name, value) in arguments {
        body.push_str(&format!("<{name}>{}</{name}>", xml_escape(value)));
    }
    body.push_str(&format!("</u:{action}></s:Body></s:Envelope>\r\n"));
    Ok(SoapRequest { soap_action: format!("\"{service_type}#{action}\""), body })
}

/// Escapes text for XML element content and double- or single-quoted attribute values.
fn xml_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&apos;"),
            c => escaped.push(c),
        }
    }
    escaped
}

// ---------------------------------------------------------------------------------------------------
// Response parsers

/// Parses a SOAP answer to `action`: the output arguments of `<u:{action}Response>`, or the Fault's
/// UPnPError as [`SoapError::Upnp`]. A Fault without a UPnPError, or anything else, is malformed.
pub fn parse_soap_response(body: &str, action: &str) -> Result<SoapArguments, SoapError> {
    let envelope = parse_xml_document(body, "the SOAP answer")?;
    if envelope.name != "Envelope" {
        return Err(SoapError::Malformed(format!(
            "the answer is a <{}>, not a SOAP Envelope",
            excerpt(&envelope.name)
        )));
    }
    let soap_body = single_child(&envelope, "Body", "the SOAP Envelope")?;
    let expected = format!("{action}Response");
    let content = soap_body.children.iter().find(|child| child.name == expected || child.name == "Fault");
    match content {
        Some(fault) if fault.name == "Fault" => Err(upnp_error_from_fault(fault)),
        Some(response) => arguments_of(response, &expected),
        None => Err(SoapError::Malformed(format!(
            "the SOAP Body holds neither {expected} nor a Fault (it holds: {})",
            excerpt(&soap_body.children.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "))
        ))),
    }
}

/// Parses the answer to GetSpecificPortMappingEntry for `protocol`/`external_port` (the request's key:
/// the answer itself only carries the internal side). `Ok(None)`: no such mapping (714).
pub fn parse_get_specific_port_mapping_entry_response(
    body: &str,
    protocol: Protocol,
    external_port: u16,
) -> Result<Option<GatewayEntry>, SoapError> {
    if external_port == 0 {
        return Err(SoapError::InvalidRequest("external port 0 is a wildcard, not a mapping to look up".into()));
    }
    let arguments = match parse_soap_response(body, GET_SPECIFIC_PORT_MAPPING_ENTRY) {
        Ok(arguments) => arguments,
        Err(SoapError::Upnp { code: UPNP_NO_SUCH_ENTRY_IN_ARRAY, .. }) => return Ok(None),
        Err(other) => return Err(other),
    };
    let context = format!("GetSpecificPortMappingEntry for {protocol} {external_port}");
    // Not part of the answer in the spec, but some gateways echo the key: it must be the one asked for.
    if let Some(answered) = arguments.get("NewExternalPort") {
        let answered = parse_port(answered, "NewExternalPort", &context)?;
        if answered != external_port {
            return Err(SoapError::Malformed(format!("{context}: the answer is about external port {answered}")));
        }
    }
    if let Some(answered) = arguments.get("NewProtocol") {
        if parse_protocol(answered, &context)? != protocol {
            return Err(SoapError::Malformed(format!("{context}: the answer is about protocol {}", excerpt(answered))));
        }
    }
    Ok(Some(GatewayEntry {
        protocol,
        external_port,
        internal_client: parse_internal_client(arguments.require("NewInternalClient", &context)?, &context)?,
        internal_port: parse_port(arguments.require("NewInternalPort", &context)?, "NewInternalPort", &context)?,
        description: parse_description(arguments.get("NewPortMappingDescription").unwrap_or(""), &context)?,
        lease_secs: parse_lease(arguments.require("NewLeaseDuration", &context)?, "NewLeaseDuration", &context)?,
        enabled: parse_enabled(arguments.require("NewEnabled", &context)?, &context)?,
    }))
}

/// Parses the answer to GetListOfPortMappings. "Nothing in range" answers (714, 730, an empty listing)
/// are an empty list.
pub fn parse_get_list_of_port_mappings_response(body: &str) -> Result<Vec<GatewayEntry>, SoapError> {
    let arguments = match parse_soap_response(body, GET_LIST_OF_PORT_MAPPINGS) {
        Ok(arguments) => arguments,
        Err(SoapError::Upnp { code: UPNP_NO_SUCH_ENTRY_IN_ARRAY | UPNP_PORT_MAPPING_NOT_FOUND, .. }) => {
            return Ok(Vec::new())
        }
        Err(other) => return Err(other),
    };
    parse_port_listing(arguments.require("NewPortListing", "GetListOfPortMappingsResponse")?)
}

/// Parses the `p:PortMappingList` document that NewPortListing carries (already unescaped from the SOAP
/// body: entity-escaped by the spec's example, a CDATA section by miniupnpd).
pub fn parse_port_listing(listing: &str) -> Result<Vec<GatewayEntry>, SoapError> {
    let listing = listing.trim_start_matches('\u{feff}').trim();
    if listing.is_empty() {
        return Ok(Vec::new());
    }
    let list = parse_xml_document(listing, "NewPortListing")?;
    if list.name != "PortMappingList" {
        return Err(SoapError::Malformed(format!(
            "NewPortListing holds a <{}>, not a PortMappingList",
            excerpt(&list.name)
        )));
    }
    let entries: Vec<&XmlElement> = list.children.iter().filter(|child| child.name == "PortMappingEntry").collect();
    if entries.len() > MAX_LISTED_ENTRIES {
        return Err(SoapError::Malformed(format!(
            "NewPortListing lists {} entries, more than the {MAX_LISTED_ENTRIES} accepted",
            entries.len()
        )));
    }
    entries
        .into_iter()
        .enumerate()
        .map(|(index, entry)| {
            let context = format!("entry {} of NewPortListing", index + 1);
            let fields = arguments_of(entry, &context)?;
            Ok(GatewayEntry {
                protocol: parse_protocol(fields.require("NewProtocol", &context)?, &context)?,
                external_port: parse_port(fields.require("NewExternalPort", &context)?, "NewExternalPort", &context)?,
                internal_client: parse_internal_client(fields.require("NewInternalClient", &context)?, &context)?,
                internal_port: parse_port(fields.require("NewInternalPort", &context)?, "NewInternalPort", &context)?,
                description: parse_description(fields.get("NewDescription").unwrap_or(""), &context)?,
                lease_secs: parse_lease(fields.require("NewLeaseTime", &context)?, "NewLeaseTime", &context)?,
                enabled: parse_enabled(fields.require("NewEnabled", &context)?, &context)?,
            })
        })
        .collect()
}

/// The Fault's `detail/UPnPError` as [`SoapError::Upnp`]; without one, [`SoapError::Malformed`] naming
/// the faultcode and faultstring.
fn upnp_error_from_fault(fault: &XmlElement) -> SoapError {
    let upnp_error = fault.child("detail").and_then(|detail| detail.child("UPnPError"));
    let Some(upnp_error) = upnp_error else {
        let text_of = |name| fault.child(name).map(|e| excerpt(&e.text)).unwrap_or_else(|| "none".into());
        return SoapError::Malformed(format!(
            "SOAP Fault without a UPnPError (faultcode {}, faultstring {})",
            text_of("faultcode"),
            text_of("faultstring")
        ));
    };
    let Some(code_element) = upnp_error.child("errorCode") else {
        return SoapError::Malformed("UPnPError without an errorCode".into());
    };
    let code = match code_element.text.trim().parse::<u16>() {
        Ok(code) => code,
        Err(_) => {
            return SoapError::Malformed(format!("UPnPError errorCode {} is not a number", excerpt(&code_element.text)))
        }
    };
    let description = upnp_error.child("errorDescription").map(|e| e.text.trim()).unwrap_or("");
    if description.len() > MAX_FIELD_BYTES {
        return SoapError::Malformed(format!(
            "UPnPError {code}: errorDescription of {} bytes, more than {MAX_FIELD_BYTES}",
            description.len()
        ));
    }
    SoapError::Upnp { code, description: description.to_owned() }
}

/// The text children of `parent`, each name once. A child with elements of its own is malformed: every
/// argument and listing field is plain text.
fn arguments_of(parent: &XmlElement, context: &str) -> Result<SoapArguments, SoapError> {
    let mut arguments = Vec::with_capacity(parent.children.len());
    for child in &parent.children {
        if !child.children.is_empty() {
            return Err(SoapError::Malformed(format!("{context}: {} holds elements, not text", excerpt(&child.name))));
        }
        if arguments.iter().any(|(name, _): &(String, String)| *name == child.name) {
            return Err(SoapError::Malformed(format!("{context}: {} appears twice", excerpt(&child.name))));
        }
        arguments.push((child.name.clone(), child.text.clone()));
    }
    Ok(SoapArguments(arguments))
}

fn single_child<'a>(parent: &'a XmlElement, name: &str, context: &str) -> Result<&'a XmlElement, SoapError> {
    let mut matching = parent.children.iter().filter(|child| child.name == name);
    match (matching.next(), matching.next()) {
        (Some(child), None) => Ok(child),
        (None, _) => Err(SoapError::Malformed(format!("{context} has no {name}"))),
        (Some(_), Some(_)) => Err(SoapError::Malformed(format!("{context} has more than one {name}"))),
    }
}

/// Numbers are trimmed (some gateways pad them); anything bigger than a field is refused before parsing.
fn bounded_field<'a>(text: &'a str, field: &str, context: &str) -> Result<&'a str, SoapError> {
    if text.len() > MAX_FIELD_BYTES {
        return Err(SoapError::Malformed(format!(
            "{context}: {field} of {} bytes, more than {MAX_FIELD_BYTES}",
            text.len()
        )));
    }
    Ok(text.trim())
}

fn parse_port(text: &str, field: &str, context: &str) -> Result<u16, SoapError> {
    match bounded_field(text, field, context)?.parse::<u16>() {
        Ok(0) => Err(SoapError::Malformed(format!("{context}: {field} is 0"))),
        Ok(port) => Ok(port),
        Err(_) => Err(SoapError::Malformed(format!("{context}: {field} {} is not a port", excerpt(text)))),
    }
}

fn parse_lease(text: &str, field: &str, context: &str) -> Result<u32, SoapError> {
    bounded_field(text, field, context)?
        .parse::<u32>()
        .map_err(|_| SoapError::Malformed(format!("{context}: {field} {} is not a number of seconds", excerpt(text))))
}

/// Upper case on the wire, but some gateways answer in lower case.
fn parse_protocol(text: &str, context: &str) -> Result<Protocol, SoapError> {
    let text = bounded_field(text, "NewProtocol", context)?;
    if text.eq_ignore_ascii_case("TCP") {
        Ok(Protocol::Tcp)
    } else if text.eq_ignore_ascii_case("UDP") {
        Ok(Protocol::Udp)
    } else {
        Err(SoapError::Malformed(format!("{context}: NewProtocol {} is neither TCP nor UDP", excerpt(text))))
    }
}

/// UPnP booleans: 0/1, false/true, no/yes (UDA 2.0, 2.5).
fn parse_enabled(text: &str, context: &str) -> Result<bool, SoapError> {
    let text = bounded_field(text, "NewEnabled", context)?;
    if text == "1" || text.eq_ignore_ascii_case("true") || text.eq_ignore_ascii_case("yes") {
        Ok(true)
    } else if text == "0" || text.eq_ignore_ascii_case("false") || text.eq_ignore_ascii_case("no") {
        Ok(false)
    } else {
        Err(SoapError::Malformed(format!("{context}: NewEnabled {} is not a boolean", excerpt(text))))
    }
}

/// An address or host name: non-empty, short, no control characters (it ends up in logs and comparisons).
fn parse_internal_client(text: &str, context: &str) -> Result<String, SoapError> {
    let text = bounded_field(text, "NewInternalClient", context)?;
    if text.is_empty() || text.len() > MAX_INTERNAL_CLIENT_BYTES || text.chars().any(char::is_control) {
        return Err(SoapError::Malformed(format!("{context}: NewInternalClient {} is not an address", excerpt(text))));
    }
    Ok(text.to_owned())
}

/// Kept exactly as sent (not trimmed): natbinder recognises its own mappings by description.
fn parse_description(text: &str, context: &str) -> Result<String, SoapError> {
    if text.len() > MAX_FIELD_BYTES {
        return Err(SoapError::Malformed(format!(
            "{context}: description of {} bytes, more than {MAX_FIELD_BYTES}",
            text.len()
        )));
    }
    Ok(text.to_owned())
}

/// Quotes at most 60 characters of untrusted text for an error message, control characters escaped.
pub(super) fn excerpt(text: &str) -> String {
    const MAX_CHARS: usize = 60;
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------
// Bounded XML reading

/// The little of an XML element the UPnP messages use: the local name (namespace prefixes vary between
/// gateways and carry nothing we check), the concatenated text (CDATA included) and the child elements.
#[derive(Debug, Default)]
struct XmlElement {
    name: String,
    text: String,
    children: Vec<XmlElement>,
}

impl XmlElement {
    fn child(&self, name: &str) -> Option<&XmlElement> {
        self.children.iter().find(|child| child.name == name)
    }
}

/// Reads `document` into an [`XmlElement`] tree, refusing anything over the size, depth and element
/// limits, and any DTD. `what` names the document in errors.
fn parse_xml_document(document: &str, what: &str) -> Result<XmlElement, SoapError> {
    if document.len() > MAX_RESPONSE_BYTES {
        return Err(SoapError::Malformed(format!(
            "{what} is {} bytes, more than the {MAX_RESPONSE_BYTES} accepted",
            document.len()
        )));
    }
    // Leading whitespace or a byte-order mark before the XML declaration is an error to xml-rs; some
    // gateways send them.
    let document = document.trim_start_matches('\u{feff}').trim_start();
    if document.is_empty() {
        return Err(SoapError::Malformed(format!("{what} is empty")));
    }
    let config = ParserConfig::new()
        .trim_whitespace(false)
        .whitespace_to_characters(true)
        .cdata_to_characters(true)
        .coalesce_characters(true)
        .ignore_comments(true)
        .ignore_root_level_whitespace(true)
        // The text is already a Rust string: an `encoding="ISO-8859-1"` declaration must not re-decode it.
        .override_encoding(Some(Encoding::Utf8))
        .ignore_invalid_encoding_declarations(true)
        .allow_multiple_root_elements(false)
        // Custom entities need a DTD, which is refused below; these bound what an entity in the root
        // element's attributes could expand to before that check runs.
        .max_entity_expansion_depth(1)
        .max_entity_expansion_length(MAX_FIELD_BYTES)
        .max_attributes(32)
        .max_attribute_length(4096)
        .max_name_length(256)
        .max_data_length(MAX_RESPONSE_BYTES);
    let mut reader = EventReader::new_with_config(document.as_bytes(), config);
    let mut open: Vec<XmlElement> = Vec::new();
    let mut element_count = 0usize;
    loop {
        let event = reader
            .next()
            .map_err(|e| SoapError::Malformed(format!("{what} is not well-formed XML: {}", excerpt(&e.to_string()))))?;
        match event {
            XmlEvent::StartElement { name, .. } => {
                if reader.doctype().is_some() {
                    return Err(SoapError::Malformed(format!("{what} carries a DTD, which SOAP forbids")));
                }
                element_count += 1;
                if element_count > MAX_XML_ELEMENTS {
                    return Err(SoapError::Malformed(format!("{what} has more than {MAX_XML_ELEMENTS} elements")));
                }
                if open.len() >= MAX_XML_DEPTH {
                    return Err(SoapError::Malformed(format!("{what} nests deeper than {MAX_XML_DEPTH} elements")));
                }
                open.push(XmlElement { name: name.local_name, ..XmlElement::default() });
            }
            XmlEvent::EndElement { .. } => {
                // xml-rs checks that tags balance, so there is always an open element here; an
                // unbalanced stream is still reported rather than trusted.
                let Some(closed) = open.pop() else {
                    return Err(SoapError::Malformed(format!("{what} closes an element it never opened")));
                };
                match open.last_mut() {
                    Some(parent) => parent.children.push(closed),
                    None => return Ok(closed),
                }
            }
            XmlEvent::Characters(text) => {
                if let Some(current) = open.last_mut() {
                    current.text.push_str(&text);
                }
            }
            XmlEvent::EndDocument => {
                return Err(SoapError::Malformed(format!("{what} has no root element")));
            }
            // Declarations, processing instructions, comments: nothing to read.
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Calls over igd-next's transport

/// Looks up the mapping of `external_port`/`protocol` (any remote host). `Ok(None)`: not mapped.
pub async fn get_specific_port_mapping_entry(
    gateway: &IgdNextGateway<Tokio>,
    protocol: Protocol,
    external_port: u16,
    timeout: Duration,
) -> Result<Option<GatewayEntry>, SoapError> {
    let request = build_get_specific_port_mapping_entry_request(&gateway.service_type, protocol, external_port)?;
    let body = send_soap_request(gateway, &request, timeout).await?;
    parse_get_specific_port_mapping_entry_response(&body, protocol, external_port)
}

/// Lists the mappings `query` asks for in one call. Only WANIPConnection:2 has this action: IGDv1
/// gateways answer 401 Invalid Action (as [`SoapError::Upnp`]) or an HTTP error page ([`SoapError::Malformed`]).
pub async fn get_list_of_port_mappings(
    gateway: &IgdNextGateway<Tokio>,
    query: &PortListingQuery,
    timeout: Duration,
) -> Result<Vec<GatewayEntry>, SoapError> {
    let request = build_get_list_of_port_mappings_request(&gateway.service_type, query)?;
    let body = send_soap_request(gateway, &request, timeout).await?;
    let entries = parse_get_list_of_port_mappings_response(&body)?;
    entries_within_query(entries, query)
}

/// Drops entries outside what was asked (some gateways ignore the protocol or range filter: what they
/// add is real but was not asked for) and refuses more entries than asked for.
fn entries_within_query(entries: Vec<GatewayEntry>, query: &PortListingQuery) -> Result<Vec<GatewayEntry>, SoapError> {
    let total = entries.len();
    let asked: Vec<GatewayEntry> = entries
        .into_iter()
        .filter(|e| e.protocol == query.protocol && (query.start_port..=query.end_port).contains(&e.external_port))
        .collect();
    if asked.len() < total {
        tracing::debug!(
            "GetListOfPortMappings: ignoring {} entries outside {} {}..={}",
            total - asked.len(),
            query.protocol,
            query.start_port,
            query.end_port
        );
    }
    if asked.len() > usize::from(query.max_entries) {
        return Err(SoapError::Malformed(format!(
            "GetListOfPortMappings listed {} entries where {} were asked for",
            asked.len(),
            query.max_entries
        )));
    }
    Ok(asked)
}

/// Sends `request` to the gateway's control URL within `timeout`. The body comes back whatever the HTTP
/// status: SOAP Faults arrive as HTTP 500 and are read by the parsers.
async fn send_soap_request(
    gateway: &IgdNextGateway<Tokio>,
    request: &SoapRequest,
    timeout: Duration,
) -> Result<String, SoapError> {
    let url = control_url(gateway.addr, &gateway.control_url)?;
    let send = <Tokio as Provider>::send_async(&url, &request.soap_action, &request.body);
    match tokio::time::timeout(timeout, send).await {
        Ok(Ok(body)) => Ok(body),
        Ok(Err(error)) => Err(transport_error(&url, error)),
        Err(_elapsed) => Err(SoapError::Transport(format!("no answer from {url} within {timeout:?}"))),
    }
}

/// Classifies igd-next's transport errors: a body that arrived but could not be read (over 1 MiB, not
/// UTF-8) is malformed; failing to build the request is ours; everything else (connect, I/O, HTTP
/// protocol, igd-next's own 10 s timeout) means the gateway is not reachable as we know it.
fn transport_error(url: &str, error: RequestError) -> SoapError {
    match error {
        RequestError::InvalidResponse(reason) => {
            SoapError::Malformed(format!("the answer from {url} could not be read: {}", excerpt(&reason)))
        }
        RequestError::Utf8Error(e) => SoapError::Malformed(format!("the answer from {url} is not UTF-8: {e}")),
        RequestError::HttpError(e) => {
            SoapError::InvalidRequest(format!("could not form an HTTP request to {url}: {e}"))
        }
        RequestError::ErrorCode(code, description) => SoapError::Upnp { code, description },
        other => SoapError::Transport(format!("{url}: {other}")),
    }
}

/// The URL to POST to, formed as igd-next's `perform_request` does (`common::endpoint::target`): the
/// control URL (a path, or an absolute http URL) resolved against the gateway's address, with the
/// address's IPv6 zone kept for link-local gateways. Unlike igd-next, the result must point at the
/// gateway's own address: a description document cannot send our requests to another host.
fn control_url(gateway_addr: SocketAddr, control_url: &str) -> Result<String, SoapError> {
    let invalid = |why: &str| SoapError::InvalidRequest(format!("control URL {}: {why}", excerpt(control_url)));
    let gateway_host = match gateway_addr {
        SocketAddr::V4(addr) => addr.to_string(),
        SocketAddr::V6(addr) => format!("[{}]:{}", addr.ip(), addr.port()),
    };
    let base = url::Url::parse(&format!("http://{gateway_host}/")).map_err(|e| invalid(&e.to_string()))?;
    let url = base.join(control_url).map_err(|e| invalid(&e.to_string()))?;
    if url.scheme() != "http" || !url.username().is_empty() || url.password().is_some() || url.fragment().is_some() {
        return Err(invalid("not a plain http URL"));
    }
    let ip = match url.host() {
        Some(url::Host::Ipv4(ip)) => std::net::IpAddr::V4(ip),
        Some(url::Host::Ipv6(ip)) => std::net::IpAddr::V6(ip),
        _ => return Err(invalid("the host is not an IP address")),
    };
    if ip != gateway_addr.ip() {
        return Err(invalid(&format!("points at {ip}, not at the gateway {}", gateway_addr.ip())));
    }
    let port = url.port_or_known_default().filter(|&port| port != 0).ok_or_else(|| invalid("no usable port"))?;
    let target = match gateway_addr {
        SocketAddr::V6(addr) => SocketAddr::V6(std::net::SocketAddrV6::new(*addr.ip(), port, 0, addr.scope_id())),
        SocketAddr::V4(addr) => SocketAddr::new((*addr.ip()).into(), port),
    };
    let mut path_and_query = url.path().to_owned();
    if let Some(query) = url.query() {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    Ok(format!("http://{target}{path_and_query}"))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    const WANIP2: &str = "urn:schemas-upnp-org:service:WANIPConnection:2";

    /// The envelope miniupnpd 2.3 wraps every answer in (upnpsoap.c BuildSendAndCloseSoapResp).
    fn miniupnpd_envelope(body_content: &str) -> String {
        format!(
            "<?xml version=\"1.0\"?>\r\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body>{body_content}</s:Body></s:Envelope>\r\n"
        )
    }

    /// miniupnpd's SoapError(), sent with HTTP 500.
    fn miniupnpd_fault(code: u16, description: &str) -> String {
        format!(
            "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" \
             s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\"><s:Body><s:Fault>\
             <faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>\
             <UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\"><errorCode>{code}</errorCode>\
             <errorDescription>{description}</errorDescription></UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n"
        )
    }

    fn specific_entry_answer(arguments: &str) -> String {
        miniupnpd_envelope(&format!(
            "<u:GetSpecificPortMappingEntryResponse xmlns:u=\"{WANIP2}\">{arguments}</u:GetSpecificPortMappingEntryResponse>"
        ))
    }

    const MINIUPNPD_SPECIFIC_ARGUMENTS: &str = "<NewInternalPort>8080</NewInternalPort>\
        <NewInternalClient>192.168.1.20</NewInternalClient><NewEnabled>1</NewEnabled>\
        <NewPortMappingDescription>natbinder tcp 8080</NewPortMappingDescription>\
        <NewLeaseDuration>3581</NewLeaseDuration>";

    /// One `p:PortMappingEntry` as miniupnpd 2.3 prints it (description and address verbatim).
    fn listing_entry(external_port: &str, protocol: &str, client: &str, description: &str, lease: &str) -> String {
        format!(
            "<p:PortMappingEntry><p:NewRemoteHost></p:NewRemoteHost><p:NewExternalPort>{external_port}</p:NewExternalPort>\
             <p:NewProtocol>{protocol}</p:NewProtocol><p:NewInternalPort>{external_port}</p:NewInternalPort>\
             <p:NewInternalClient>{client}</p:NewInternalClient><p:NewEnabled>1</p:NewEnabled>\
             <p:NewDescription>{description}</p:NewDescription><p:NewLeaseTime>{lease}</p:NewLeaseTime></p:PortMappingEntry>"
        )
    }

    fn port_mapping_list(entries: &str) -> String {
        format!(
            "<p:PortMappingList xmlns:p=\"urn:schemas-upnp-org:gw:WANIPConnection\" \
             xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" \
             xsi:schemaLocation=\"urn:schemas-upnp-org:gw:WANIPConnection \
             http://www.upnp.org/schemas/gw/WANIPConnection-v2.xsd\">{entries}</p:PortMappingList>"
        )
    }

    /// miniupnpd 2.3 puts the listing in a CDATA section.
    fn miniupnpd_list_answer(entries: &str) -> String {
        miniupnpd_envelope(&format!(
            "<u:GetListOfPortMappingsResponse xmlns:u=\"{WANIP2}\"><NewPortListing><![CDATA[{}]]></NewPortListing>\
             </u:GetListOfPortMappingsResponse>",
            port_mapping_list(entries)
        ))
    }

    /// The IGDv2 spec's form: the listing document entity-escaped as text.
    fn escaped_list_answer(entries: &str) -> String {
        let listing = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n{}", port_mapping_list(entries));
        miniupnpd_envelope(&format!(
            "<u:GetListOfPortMappingsResponse xmlns:u=\"{WANIP2}\">\n<NewPortListing>{}</NewPortListing>\n\
             </u:GetListOfPortMappingsResponse>",
            xml_escape(&listing)
        ))
    }

    fn entry(protocol: Protocol, port: u16, client: &str, description: &str, lease_secs: u32) -> GatewayEntry {
        GatewayEntry {
            protocol,
            external_port: port,
            internal_client: client.into(),
            internal_port: port,
            description: description.into(),
            lease_secs,
            enabled: true,
        }
    }

    fn assert_malformed<T: std::fmt::Debug>(result: Result<T, SoapError>, mentioning: &str) {
        match result {
            Err(SoapError::Malformed(reason)) => {
                assert!(reason.contains(mentioning), "the reason {reason:?} should mention {mentioning:?}")
            }
            other => panic!("expected Malformed mentioning {mentioning:?}, got {other:?}"),
        }
    }

    // --- GetSpecificPortMappingEntry answers

    #[test]
    fn miniupnpd_specific_entry_is_read_with_the_requested_key() {
        let answer = specific_entry_answer(MINIUPNPD_SPECIFIC_ARGUMENTS);
        let found = parse_get_specific_port_mapping_entry_response(&answer, Protocol::Tcp, 8080).unwrap();
        assert_eq!(found, Some(entry(Protocol::Tcp, 8080, "192.168.1.20", "natbinder tcp 8080", 3581)));
    }

    #[test]
    fn a_mapping_that_is_not_there_is_none() {
        let answer = miniupnpd_fault(714, "NoSuchEntryInArray");
        assert_eq!(parse_get_specific_port_mapping_entry_response(&answer, Protocol::Udp, 5000), Ok(None));
    }

    #[test]
    fn other_faults_keep_their_code_and_description() {
        for (code, description) in
            [(606, "Action not authorized"), (713, "SpecifiedArrayIndexInvalid"), (501, "ActionFailed")]
        {
            let answer = miniupnpd_fault(code, description);
            assert_eq!(
                parse_get_specific_port_mapping_entry_response(&answer, Protocol::Tcp, 8080),
                Err(SoapError::Upnp { code, description: description.into() })
            );
            assert_eq!(
                parse_get_list_of_port_mappings_response(&answer),
                Err(SoapError::Upnp { code, description: description.into() })
            );
        }
    }

    #[test]
    fn an_echoed_key_must_match_the_request_and_may_be_lower_case() {
        let echo = |port: &str, protocol: &str| {
            specific_entry_answer(&format!(
                "<NewExternalPort>{port}</NewExternalPort><NewProtocol>{protocol}</NewProtocol>{MINIUPNPD_SPECIFIC_ARGUMENTS}"
            ))
        };
        let read = parse_get_specific_port_mapping_entry_response(&echo("8080", "tcp"), Protocol::Tcp, 8080).unwrap();
        assert_eq!(read.map(|e| (e.protocol, e.external_port)), Some((Protocol::Tcp, 8080)));
        assert_malformed(
            parse_get_specific_port_mapping_entry_response(&echo("8081", "TCP"), Protocol::Tcp, 8080),
            "external port 8081",
        );
        assert_malformed(
            parse_get_specific_port_mapping_entry_response(&echo("8080", "UDP"), Protocol::Tcp, 8080),
            "protocol",
        );
    }

    #[test]
    fn specific_entry_fields_are_required_except_the_description() {
        let without = |field: &str| {
            let arguments = MINIUPNPD_SPECIFIC_ARGUMENTS
                .split_inclusive(&format!("</{field}>"))
                .map(|part| part.find(&format!("<{field}>")).map_or(part, |start| &part[..start]))
                .collect::<String>();
            assert!(!arguments.contains(field), "{field} was not removed from {arguments}");
            parse_get_specific_port_mapping_entry_response(&specific_entry_answer(&arguments), Protocol::Tcp, 8080)
        };
        for field in ["NewInternalPort", "NewInternalClient", "NewEnabled", "NewLeaseDuration"] {
            assert_malformed(without(field), &format!("{field} is missing"));
        }
        assert_eq!(without("NewPortMappingDescription").unwrap().unwrap().description, "");
    }

    #[test]
    fn impossible_internal_ports_are_malformed_not_guessed() {
        for (port, mentioning) in
            [("0", "NewInternalPort is 0"), ("65536", "not a port"), ("-1", "not a port"), ("", "not a port")]
        {
            let arguments = MINIUPNPD_SPECIFIC_ARGUMENTS.replace(">8080<", &format!(">{port}<"));
            let answer = specific_entry_answer(&arguments);
            assert_malformed(parse_get_specific_port_mapping_entry_response(&answer, Protocol::Tcp, 8080), mentioning);
        }
    }

    #[test]
    fn padded_numbers_and_word_booleans_are_read() {
        let arguments =
            "<NewInternalPort> 8080\n</NewInternalPort><NewInternalClient> 192.168.1.20 </NewInternalClient>\
            <NewEnabled>false</NewEnabled><NewLeaseDuration>\t0</NewLeaseDuration>";
        let entry = parse_get_specific_port_mapping_entry_response(&specific_entry_answer(arguments), Protocol::Udp, 9)
            .unwrap()
            .unwrap();
        assert_eq!((entry.internal_port, entry.internal_client.as_str()), (8080, "192.168.1.20"));
        assert_eq!((entry.enabled, entry.lease_secs), (false, 0));
    }

    #[test]
    fn another_actions_answer_is_malformed() {
        let answer = miniupnpd_envelope(&format!(
            "<u:GetGenericPortMappingEntryResponse xmlns:u=\"{WANIP2}\">{MINIUPNPD_SPECIFIC_ARGUMENTS}</u:GetGenericPortMappingEntryResponse>"
        ));
        assert_malformed(
            parse_get_specific_port_mapping_entry_response(&answer, Protocol::Tcp, 8080),
            "neither GetSpecificPortMappingEntryResponse nor a Fault",
        );
    }

    #[test]
    fn a_field_given_twice_is_malformed() {
        let answer =
            specific_entry_answer(&format!("{MINIUPNPD_SPECIFIC_ARGUMENTS}<NewInternalPort>22</NewInternalPort>"));
        assert_malformed(parse_get_specific_port_mapping_entry_response(&answer, Protocol::Tcp, 8080), "appears twice");
    }

    // --- Faults

    #[test]
    fn faults_without_a_usable_upnp_error_are_malformed() {
        let plain_fault = miniupnpd_envelope(
            "<s:Fault><faultcode>s:Server</faultcode><faultstring>Internal\nError</faultstring></s:Fault>",
        );
        assert_malformed(parse_soap_response(&plain_fault, "X"), "faultstring \"Internal\\nError\"");
        assert_malformed(parse_soap_response(&miniupnpd_fault(0, "x").replace(">0<", ">seven<"), "X"), "not a number");
        assert_malformed(parse_soap_response(&miniupnpd_fault(0, "x").replace(">0<", ">70000<"), "X"), "not a number");
        let long = "d".repeat(MAX_FIELD_BYTES + 1);
        assert_malformed(parse_soap_response(&miniupnpd_fault(718, &long), "X"), "errorDescription of 1025 bytes");
    }

    #[test]
    fn a_fault_with_unprefixed_elements_and_padding_is_read() {
        let answer = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Envelope xmlns=\"http://schemas.xmlsoap.org/soap/envelope/\">\
            <Body>\n  <Fault><faultcode>Client</faultcode><faultstring>UPnPError</faultstring><detail><UPnPError>\
            <errorCode> 718 </errorCode><errorDescription>ConflictInMappingEntry</errorDescription></UPnPError>\
            </detail></Fault>\n</Body></Envelope>";
        assert_eq!(
            parse_soap_response(answer, "AddPortMapping"),
            Err(SoapError::Upnp { code: 718, description: "ConflictInMappingEntry".into() })
        );
    }

    // --- GetListOfPortMappings answers

    #[test]
    fn an_empty_listing_is_an_empty_list() {
        assert_eq!(parse_get_list_of_port_mappings_response(&miniupnpd_list_answer("")), Ok(vec![]));
        assert_eq!(parse_get_list_of_port_mappings_response(&escaped_list_answer("")), Ok(vec![]));
        let blank_listing = miniupnpd_envelope(&format!(
            "<u:GetListOfPortMappingsResponse xmlns:u=\"{WANIP2}\"><NewPortListing> </NewPortListing></u:GetListOfPortMappingsResponse>"
        ));
        assert_eq!(parse_get_list_of_port_mappings_response(&blank_listing), Ok(vec![]));
    }

    #[test]
    fn nothing_in_range_faults_are_an_empty_list() {
        for (code, description) in [(714, "NoSuchEntryInArray"), (730, "PortMappingNotFound")] {
            assert_eq!(parse_get_list_of_port_mappings_response(&miniupnpd_fault(code, description)), Ok(vec![]));
        }
    }

    #[test]
    fn miniupnpd_listing_of_one_entry_is_read() {
        let answer = miniupnpd_list_answer(&listing_entry("8080", "TCP", "192.168.1.20", "natbinder tcp 8080", "3581"));
        assert_eq!(
            parse_get_list_of_port_mappings_response(&answer),
            Ok(vec![entry(Protocol::Tcp, 8080, "192.168.1.20", "natbinder tcp 8080", 3581)])
        );
    }

    #[test]
    fn a_listing_of_several_entries_keeps_their_order_and_values() {
        let entries = [
            listing_entry("8080", "TCP", "192.168.1.20", "natbinder tcp 8080", "3581"),
            listing_entry("51413", "UDP", "192.168.1.33", "Transmission at 51413", "0"),
            listing_entry("443", "tcp", "192.168.1.7", "", "604800").replace("<p:NewEnabled>1<", "<p:NewEnabled>0<"),
        ]
        .concat();
        let expected = vec![
            entry(Protocol::Tcp, 8080, "192.168.1.20", "natbinder tcp 8080", 3581),
            entry(Protocol::Udp, 51413, "192.168.1.33", "Transmission at 51413", 0),
            GatewayEntry { enabled: false, ..entry(Protocol::Tcp, 443, "192.168.1.7", "", 604800) },
        ];
        assert_eq!(parse_get_list_of_port_mappings_response(&miniupnpd_list_answer(&entries)), Ok(expected.clone()));
        assert_eq!(parse_get_list_of_port_mappings_response(&escaped_list_answer(&entries)), Ok(expected));
    }

    #[test]
    fn escaped_descriptions_come_back_as_the_characters_they_stand_for() {
        let description = "<game> & \"chat\" — ünïcødé 🚀";
        // Inside the listing the description is escaped once; the spec's form escapes the listing again.
        let entries = listing_entry("7777", "UDP", "192.168.1.9", &xml_escape(description), "60");
        for answer in [miniupnpd_list_answer(&entries), escaped_list_answer(&entries)] {
            let listed = parse_get_list_of_port_mappings_response(&answer).unwrap();
            assert_eq!(listed.len(), 1);
            assert_eq!(listed[0].description, description);
        }
        let specific = specific_entry_answer(
            &MINIUPNPD_SPECIFIC_ARGUMENTS.replace("natbinder tcp 8080", &xml_escape(description)),
        );
        let read = parse_get_specific_port_mapping_entry_response(&specific, Protocol::Tcp, 8080).unwrap().unwrap();
        assert_eq!(read.description, description);
    }

    #[test]
    fn a_raw_angle_bracket_in_a_cdata_listing_is_malformed() {
        // miniupnpd prints descriptions into the CDATA section verbatim: a '<' there breaks the listing.
        let answer = miniupnpd_list_answer(&listing_entry("7777", "UDP", "192.168.1.9", "a<b", "60"));
        assert_malformed(parse_get_list_of_port_mappings_response(&answer), "NewPortListing is not well-formed XML");
    }

    #[test]
    fn a_listing_entry_missing_a_field_names_the_entry() {
        let broken = listing_entry("9000", "TCP", "192.168.1.9", "x", "60")
            .replace("<p:NewInternalPort>9000</p:NewInternalPort>", "");
        let entries = [listing_entry("8080", "TCP", "192.168.1.20", "ok", "60"), broken].concat();
        assert_malformed(
            parse_get_list_of_port_mappings_response(&miniupnpd_list_answer(&entries)),
            "entry 2 of NewPortListing: NewInternalPort is missing",
        );
    }

    #[test]
    fn listing_entries_with_impossible_values_are_malformed() {
        for (entry, mentioning) in [
            (listing_entry("0", "TCP", "192.168.1.9", "x", "60"), "NewExternalPort is 0"),
            (listing_entry("65536", "TCP", "192.168.1.9", "x", "60"), "not a port"),
            (listing_entry("80", "SCTP", "192.168.1.9", "x", "60"), "neither TCP nor UDP"),
            (listing_entry("80", "TCP", "", "x", "60"), "not an address"),
            (listing_entry("80", "TCP", "192.168.1.9", "x", "-5"), "not a number of seconds"),
            (listing_entry("80", "TCP", "192.168.1.9", "x", "4294967296"), "not a number of seconds"),
            (
                listing_entry("80", "TCP", "192.168.1.9", "x", "60").replace(">1</p:NewEnabled", ">2</p:NewEnabled"),
                "NewEnabled",
            ),
            (
                listing_entry("80", "TCP", "192.168.1.9", &"x".repeat(MAX_FIELD_BYTES + 1), "60"),
                "description of 1025 bytes",
            ),
        ] {
            assert_malformed(parse_get_list_of_port_mappings_response(&miniupnpd_list_answer(&entry)), mentioning);
        }
    }

    #[test]
    fn a_listing_without_port_listing_or_of_the_wrong_kind_is_malformed() {
        let no_listing = miniupnpd_envelope(&format!(
            "<u:GetListOfPortMappingsResponse xmlns:u=\"{WANIP2}\"></u:GetListOfPortMappingsResponse>"
        ));
        assert_malformed(parse_get_list_of_port_mappings_response(&no_listing), "NewPortListing is missing");
        assert_malformed(parse_port_listing("<html><body>hi</body></html>"), "not a PortMappingList");
        assert_malformed(parse_port_listing("PortMappingList"), "not well-formed");
    }

    #[test]
    fn up_to_4096_entries_are_accepted_and_more_refused() {
        let compact = "<PortMappingEntry><NewExternalPort>1</NewExternalPort><NewProtocol>TCP</NewProtocol>\
            <NewInternalPort>1</NewInternalPort><NewInternalClient>10.0.0.1</NewInternalClient>\
            <NewEnabled>1</NewEnabled><NewLeaseTime>0</NewLeaseTime></PortMappingEntry>";
        let full = format!("<PortMappingList>{}</PortMappingList>", compact.repeat(MAX_LISTED_ENTRIES));
        assert_eq!(parse_port_listing(&full).map(|entries| entries.len()), Ok(MAX_LISTED_ENTRIES));
        let over =
            format!("<PortMappingList>{}</PortMappingList>", "<PortMappingEntry/>".repeat(MAX_LISTED_ENTRIES + 1));
        assert_malformed(parse_port_listing(&over), "lists 4097 entries, more than the 4096 accepted");
    }

    // --- Hostile and broken input

    #[test]
    fn garbage_and_empty_answers_are_malformed() {
        for garbage in
            ["", "   \r\n", "not xml at all", "<", "\u{feff}", "<a></b>", "<html><body>404 Not Found</body></html>"]
        {
            assert!(
                matches!(parse_soap_response(garbage, "X"), Err(SoapError::Malformed(_))),
                "{garbage:?} should be malformed"
            );
            assert!(matches!(parse_get_list_of_port_mappings_response(garbage), Err(SoapError::Malformed(_))));
        }
        assert_malformed(parse_soap_response("<Envelope><Header/></Envelope>", "X"), "has no Body");
        assert_malformed(parse_soap_response("<Envelope><Body/><Body/></Envelope>", "X"), "more than one Body");
    }

    #[test]
    fn every_truncation_of_an_answer_is_an_error() {
        for answer in [
            specific_entry_answer(MINIUPNPD_SPECIFIC_ARGUMENTS),
            miniupnpd_list_answer(&listing_entry("8080", "TCP", "192.168.1.20", "x", "1")),
            escaped_list_answer(&listing_entry("8080", "TCP", "192.168.1.20", "x", "1")),
        ] {
            let complete = answer.trim_end().len();
            for cut in (0..complete).filter(|&cut| answer.is_char_boundary(cut)) {
                let truncated = &answer[..cut];
                assert!(parse_get_list_of_port_mappings_response(truncated).is_err(), "accepted {truncated:?}");
                assert!(
                    parse_get_specific_port_mapping_entry_response(truncated, Protocol::Tcp, 8080).is_err(),
                    "accepted {truncated:?}"
                );
            }
        }
    }

    #[test]
    fn oversized_answers_are_refused_before_parsing() {
        let huge = miniupnpd_list_answer(&" ".repeat(MAX_RESPONSE_BYTES));
        assert_malformed(parse_get_list_of_port_mappings_response(&huge), "more than the 1048576 accepted");
        assert_malformed(parse_port_listing(&" x".repeat(MAX_RESPONSE_BYTES)), "more than the 1048576 accepted");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let deep = format!("{}{}", "<a>".repeat(10_000), "</a>".repeat(10_000));
        assert_malformed(parse_soap_response(&deep, "X"), "nests deeper than 16");
    }

    #[test]
    fn a_dtd_is_refused_so_entities_cannot_expand() {
        let laughs = "<?xml version=\"1.0\"?><!DOCTYPE Envelope [<!ENTITY a \"aaaaaaaaaa\">\
            <!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\"><!ENTITY c \"&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;\">]>\
            <Envelope><Body><XResponse><NewA>&c;&c;&c;&c;</NewA></XResponse></Body></Envelope>";
        assert_malformed(parse_soap_response(laughs, "X"), "DTD");
        // An entity in the root's attributes is expanded before the DTD is noticed: the limits bound it.
        let in_attribute = "<!DOCTYPE E [<!ENTITY a \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\">]>\
            <E x=\"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\"/>";
        assert!(matches!(parse_soap_response(in_attribute, "X"), Err(SoapError::Malformed(_))));
    }

    #[test]
    fn a_non_utf8_encoding_declaration_does_not_garble_text() {
        let answer = specific_entry_answer(&MINIUPNPD_SPECIFIC_ARGUMENTS.replace("natbinder tcp 8080", "café"))
            .replace("<?xml version=\"1.0\"?>", "<?xml version=\"1.0\" encoding=\"ISO-8859-1\"?>");
        let read = parse_get_specific_port_mapping_entry_response(&answer, Protocol::Tcp, 8080).unwrap().unwrap();
        assert_eq!(read.description, "café");
    }

    #[test]
    fn error_messages_quote_untrusted_text_briefly() {
        let answer = miniupnpd_envelope(&format!("<Evil{}/>", "x".repeat(200)));
        let Err(SoapError::Malformed(reason)) = parse_soap_response(&answer, "X") else { panic!("not malformed") };
        assert!(reason.len() < 200, "{reason}");
    }

    // --- Request builders

    /// Our requests must be what our own parser (and so any XML parser) reads back.
    fn request_arguments(request: &SoapRequest, action: &str) -> Vec<(String, String)> {
        let envelope = parse_xml_document(&request.body, "request").unwrap();
        let body = single_child(&envelope, "Body", "request").unwrap();
        let call = single_child(body, action, "request").unwrap();
        arguments_of(call, "request").unwrap().0
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()
    }

    #[test]
    fn specific_entry_request_names_the_service_and_wildcard_remote_host() {
        let request = build_get_specific_port_mapping_entry_request(WANIP2, Protocol::Udp, 51413).unwrap();
        assert_eq!(request.soap_action, format!("\"{WANIP2}#GetSpecificPortMappingEntry\""));
        assert!(request.body.contains(&format!("<u:GetSpecificPortMappingEntry xmlns:u=\"{WANIP2}\">")));
        assert_eq!(
            request_arguments(&request, "GetSpecificPortMappingEntry"),
            pairs(&[("NewRemoteHost", ""), ("NewExternalPort", "51413"), ("NewProtocol", "UDP")])
        );
        assert!(matches!(
            build_get_specific_port_mapping_entry_request(WANIP2, Protocol::Tcp, 0),
            Err(SoapError::InvalidRequest(_))
        ));
    }

    #[test]
    fn list_request_asks_for_every_hosts_mappings_in_range() {
        let query = PortListingQuery { protocol: Protocol::Tcp, start_port: 1024, end_port: 65535, max_entries: 1000 };
        let request = build_get_list_of_port_mappings_request(WANIP2, &query).unwrap();
        assert_eq!(request.soap_action, format!("\"{WANIP2}#GetListOfPortMappings\""));
        assert_eq!(
            request_arguments(&request, "GetListOfPortMappings"),
            pairs(&[
                ("NewStartPort", "1024"),
                ("NewEndPort", "65535"),
                ("NewProtocol", "TCP"),
                ("NewManage", "1"),
                ("NewNumberOfPorts", "1000")
            ])
        );
        for bad in [
            PortListingQuery { start_port: 0, ..query },
            PortListingQuery { start_port: 2000, end_port: 1999, ..query },
            PortListingQuery { max_entries: 0, ..query },
            PortListingQuery { max_entries: 4097, ..query },
        ] {
            assert!(matches!(build_get_list_of_port_mappings_request(WANIP2, &bad), Err(SoapError::InvalidRequest(_))));
        }
    }

    #[test]
    fn service_types_are_escaped_or_refused() {
        let odd = "urn:vendor&co:service:WANIPConnection:1";
        let request = build_get_specific_port_mapping_entry_request(odd, Protocol::Tcp, 80).unwrap();
        assert!(request.body.contains("xmlns:u=\"urn:vendor&amp;co:service:WANIPConnection:1\""));
        assert_eq!(request_arguments(&request, "GetSpecificPortMappingEntry").len(), 3);
        for refused in ["", "urn:a\"b", "urn:a#b", "urn:a\r\nX-Injected: 1", "urn:a b", &"u".repeat(257)] {
            assert!(
                matches!(
                    build_get_specific_port_mapping_entry_request(refused, Protocol::Tcp, 80),
                    Err(SoapError::InvalidRequest(_))
                ),
                "{refused:?} was accepted"
            );
        }
    }

    // --- Control URL

    #[test]
    fn control_url_is_formed_like_igd_next_and_stays_on_the_gateway() {
        let gateway: SocketAddr = "192.168.1.1:5000".parse().unwrap();
        assert_eq!(control_url(gateway, "/ctl/IPConn").unwrap(), "http://192.168.1.1:5000/ctl/IPConn");
        assert_eq!(control_url(gateway, "ctl/IPConn?x=1").unwrap(), "http://192.168.1.1:5000/ctl/IPConn?x=1");
        assert_eq!(
            control_url(gateway, "http://192.168.1.1:49000/upnp/control").unwrap(),
            "http://192.168.1.1:49000/upnp/control"
        );
        assert_eq!(control_url(gateway, "http://192.168.1.1/c").unwrap(), "http://192.168.1.1:80/c");
        for refused in [
            "http://10.0.0.1:5000/ctl",
            "http://router.lan/ctl",
            "https://192.168.1.1/ctl",
            "http://u:p@192.168.1.1/c",
            "/c#f",
        ] {
            assert!(
                matches!(control_url(gateway, refused), Err(SoapError::InvalidRequest(_))),
                "{refused} was accepted"
            );
        }
        let link_local = SocketAddr::V6(std::net::SocketAddrV6::new("fe80::1".parse().unwrap(), 5000, 0, 3));
        assert_eq!(control_url(link_local, "/ctl").unwrap(), "http://[fe80::1%3]:5000/ctl");
    }

    // --- Calls, against a fake gateway on loopback

    fn fake_gateway(addr: SocketAddr) -> IgdNextGateway<Tokio> {
        IgdNextGateway {
            addr,
            root_url: "/rootDesc.xml".into(),
            control_url: "/ctl/IPConn".into(),
            control_schema_url: "/WANIPCn.xml".into(),
            control_schema: HashMap::new(),
            service_type: WANIP2.into(),
            ipv6_firewall_control_url: None,
            provider: Tokio,
        }
    }

    /// Serves one HTTP request with `status` and `body`; yields the request it received.
    async fn serve_once(status: &'static str, body: String) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = stream.read(&mut chunk).await.unwrap();
                request.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
                assert!(n > 0, "the client closed before sending a whole request");
            }
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        (addr, server)
    }

    #[tokio::test]
    async fn a_fault_sent_with_http_500_is_read_as_the_upnp_error() {
        let (addr, server) = serve_once("500 Internal Server Error", miniupnpd_fault(714, "NoSuchEntryInArray")).await;
        let gateway = fake_gateway(addr);
        let found = get_specific_port_mapping_entry(&gateway, Protocol::Tcp, 8080, Duration::from_secs(5)).await;
        assert_eq!(found, Ok(None));
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /ctl/IPConn HTTP/1.1\r\n"), "{request}");
        assert!(request.contains(&format!("\"{WANIP2}#GetSpecificPortMappingEntry\"")), "{request}");
        assert!(request.contains("<NewExternalPort>8080</NewExternalPort>"), "{request}");
    }

    #[tokio::test]
    async fn a_listing_is_fetched_and_filtered_to_the_query() {
        let entries = [
            listing_entry("8080", "TCP", "192.168.1.20", "natbinder tcp 8080", "3581"),
            // A gateway ignoring the protocol filter: real, but not asked for.
            listing_entry("8080", "UDP", "192.168.1.20", "natbinder udp 8080", "3581"),
        ]
        .concat();
        let (addr, server) = serve_once("200 OK", miniupnpd_list_answer(&entries)).await;
        let query = PortListingQuery { protocol: Protocol::Tcp, start_port: 1024, end_port: 65535, max_entries: 100 };
        let listed = get_list_of_port_mappings(&fake_gateway(addr), &query, Duration::from_secs(5)).await;
        assert_eq!(listed, Ok(vec![entry(Protocol::Tcp, 8080, "192.168.1.20", "natbinder tcp 8080", 3581)]));
        assert!(server.await.unwrap().contains("<NewManage>1</NewManage>"));
    }

    #[tokio::test]
    async fn an_http_error_page_is_malformed() {
        let (addr, _server) = serve_once("404 Not Found", "<html><body>Not Found</body></html>".into()).await;
        let found =
            get_specific_port_mapping_entry(&fake_gateway(addr), Protocol::Tcp, 8080, Duration::from_secs(5)).await;
        assert_malformed(found, "not a SOAP Envelope");
    }

    #[tokio::test]
    async fn a_closed_port_is_a_transport_error() {
        let addr = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap().local_addr().unwrap();
        // The listener is dropped: connecting is refused, as when miniupnpd restarted on another port.
        let found =
            get_specific_port_mapping_entry(&fake_gateway(addr), Protocol::Tcp, 8080, Duration::from_secs(5)).await;
        assert!(matches!(found, Err(SoapError::Transport(_))), "{found:?}");
        assert!(matches!(AddError::from(found.unwrap_err()), AddError::Unreachable(_)));
    }

    #[tokio::test]
    async fn a_silent_gateway_is_a_transport_error_after_the_timeout() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _silent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        });
        let started = std::time::Instant::now();
        let query = PortListingQuery { protocol: Protocol::Udp, start_port: 1, end_port: 65535, max_entries: 10 };
        let listed = get_list_of_port_mappings(&fake_gateway(addr), &query, Duration::from_millis(300)).await;
        match listed {
            Err(SoapError::Transport(reason)) => assert!(reason.contains("within 300ms"), "{reason}"),
            other => panic!("expected a transport error, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn more_entries_than_asked_for_are_malformed() {
        let query = PortListingQuery { protocol: Protocol::Tcp, start_port: 1, end_port: 65535, max_entries: 1 };
        let two = vec![entry(Protocol::Tcp, 80, "10.0.0.2", "", 0), entry(Protocol::Tcp, 81, "10.0.0.2", "", 0)];
        assert_malformed(entries_within_query(two, &query), "listed 2 entries where 1 were asked for");
        let out_of_range = vec![entry(Protocol::Tcp, 80, "10.0.0.2", "", 0)];
        let narrow = PortListingQuery { start_port: 81, end_port: 90, ..query };
        assert_eq!(entries_within_query(out_of_range, &narrow), Ok(vec![]));
    }

    #[test]
    fn refusals_become_refused_add_errors() {
        let upnp = SoapError::Upnp { code: 606, description: "Action not authorized".into() };
        assert!(matches!(AddError::from(upnp), AddError::Refused(reason) if reason.contains("606")));
        assert!(matches!(AddError::from(SoapError::Malformed("x".into())), AddError::Refused(_)));
    }
}
