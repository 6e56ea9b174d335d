// ES module entry of the SDK: import IMClient from "/sdk/im.client.mjs";
// Browsers evaluate the plain script as a module (it defines globalThis.IMClient); Node loads it as
// CommonJS (its module.exports is the namespace's default). Either way, re-export the one class.
import * as loaded from "./im.client.js";

const IMClient = loaded.default || globalThis.IMClient;
export const IMError = IMClient.IMError;
export { IMClient };
export default IMClient;
